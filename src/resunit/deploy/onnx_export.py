"""ONNX export of the folded model, verified in ONNX Runtime against PyTorch.

:class:`OnnxRuntimeModel` runs a file as a module, so it can be evaluated and benchmarked
like any other.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.analysis import check_input_channels, shape_text
from resunit.deploy.folding import fold_batchnorm, relative_difference
from resunit.errors import ConfigError, DeployError, first_line
from resunit.models import dtype_and_device
from resunit.outputs import atomic_output, check_output_location, reason

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4


def require_onnx() -> Any:
    """The ``onnxruntime`` module; a :class:`DeployError` naming the ``[onnx]`` extra when it
    (or ``onnx``) is not installed, so a command can fail before any work."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise DeployError(
            "ONNX export needs the optional dependencies: pip install 'resunit[onnx]'"
        ) from None
    return onnxruntime


def onnx_available() -> bool:
    """True when the ``[onnx]`` extra (onnx + onnxruntime) is installed."""
    try:
        require_onnx()
    except DeployError:
        return False
    return True


def _require_weights(model: nn.Module) -> None:
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise DeployError("the model is on the meta device: it has no weights to run or export")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    dynamic_batch: bool = False,
    fold: bool = True,
    opset: int = ONNX_OPSET,
) -> Path:
    """Write ``model`` (BatchNorm folded unless ``fold=False``) to a float32 ONNX file.

    Uses the TorchScript-based exporter (``dynamo=False``): for a static ResNet it produces a
    plain Conv/Relu/Add graph with no extra dependencies, and the result is verified anyway
    (:func:`verify_onnx`). ``dynamic_batch`` leaves the batch dimension symbolic.

    The graph is always float32, the type ONNX Runtime's CPU kernels take: a model in another
    dtype or on a GPU is folded in its own dtype (float64 folds more exactly), then a copy is
    converted to float32 on the CPU and exported. The model itself is not modified.
    """
    require_onnx()
    if isinstance(path, nn.Module):  # verify_onnx takes (path, model): easily swapped
        raise ConfigError("export_onnx takes (model, path, input_shape): the model first")
    _require_weights(model)
    check_input_channels(model, input_shape)
    path = Path(path)
    check_output_location(path, "the ONNX path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder of {path}: {reason(exc)}") from None
    export_model = fold_batchnorm(model) if fold else copy.deepcopy(model).eval()
    export_model = export_model.to(device="cpu", dtype=torch.float32)
    example = torch.randn(1, *input_shape)
    dynamic_axes = (
        {ONNX_INPUT_NAME: {0: "batch"}, ONNX_OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    )
    # Written whole or not at all: an export that fails halfway leaves no file at path.
    with atomic_output(path, "the ONNX file") as tmp, torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            export_model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
        )
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The legacy exporter announces its own deprecation on every call; the export is verified
    # numerically, so the warning adds nothing for our users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def onnxruntime_session(
    path: str | os.PathLike[str], threads: int | None = None, *, spin: bool = False
) -> Any:
    """An ONNX Runtime CPU session with every graph optimisation and ``threads`` threads.

    ``spin=False`` makes idle worker threads sleep at once instead of busy-waiting for the
    next piece of work. In a process that also runs PyTorch (evaluation, benchmarks) spinning
    threads take the cores from PyTorch's: we measured eager ResNet-20 2-4× slower right after
    an ONNX Runtime call on 2 cores. But ONNX Runtime itself needs spinning at small batches,
    where its threads wait between every two layers: ResNet-20 at batch 1 ran 2270 img/s
    spinning and 1300 not (on its own, 2 cores). A process that only serves ONNX Runtime
    should spin (ONNX Runtime's default); the benchmarks time both.
    """
    ort = require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    if not Path(path).is_file():
        raise DeployError(f"no ONNX file at {path}")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise DeployError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime, called like a model: ``Tensor → Tensor``.

    A (parameter-free) ``nn.Module`` so that code written for models, such as evaluation
    loops, accepts it unchanged. Inputs of any dtype or device are run as float32 on the CPU.
    A file exported for one batch size (``export_onnx``'s default) takes any batch: it is run
    in pieces of that size. Calling it from several threads at once is safe (ONNX Runtime
    sessions allow it).
    """

    def __init__(
        self, path: str | os.PathLike[str], threads: int | None = None, *, spin: bool = False
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = onnxruntime_session(path, threads, spin=spin)
        first_input = self.session.get_inputs()[0]
        self.input_name = first_input.name
        batch = first_input.shape[0] if first_input.shape else None
        #: The batch size the file was exported for; None when it takes any.
        self.batch_size: int | None = batch if isinstance(batch, int) else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            shape = shape_text(x.shape)
            raise ConfigError(f"{self.path} takes N×C×H×W batches, got a tensor of {shape}")
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        size = self.batch_size
        if size is None or len(x) == size:
            return self.run(x)
        outputs = []
        for piece in x.split(size):
            count = len(piece)
            if count < size:  # only the last piece: zero-padded, as images are independent
                piece = torch.cat([piece, piece.new_zeros(size - count, *piece.shape[1:])])
            outputs.append(self.run(piece)[:count])
        return torch.cat(outputs)

    def run(self, x: Tensor) -> Tensor:
        """One ONNX Runtime call on exactly ``x`` (a contiguous float32 CPU tensor)."""
        try:
            (out,) = self.session.run(None, {self.input_name: x.numpy()})
        except Exception as exc:  # onnxruntime raises its own exception types
            shape = shape_text(x.shape[1:])
            raise DeployError(
                f"ONNX Runtime cannot run {self.path} on a batch of {len(x)} ({shape} images): "
                f"{first_line(exc)}"
            ) from None
        return torch.from_numpy(out)


@dataclass
class OnnxCheck:
    """The result of running an export in ONNX Runtime against the PyTorch model."""

    path: str
    batch_sizes: list[int]
    max_relative_difference: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_relative_difference <= self.tolerance


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] | None = None,
    tolerance: float = ONNX_TOLERANCE,
    seed: int = 0,
) -> OnnxCheck:
    """Run the ONNX file in ONNX Runtime on seeded random inputs and compare with ``model``.

    ``batch_sizes`` default to what the file takes: 1 and 2 when its batch is dynamic, its
    fixed batch size otherwise. Each is run as one ONNX Runtime call, as a deployment would.

    The reference is the original eval-mode model (not the folded copy that was exported), so
    the check covers folding and export together. It runs in the model's own dtype and on its
    device, on the same float32 inputs that ONNX Runtime gets. Raises :class:`DeployError`
    when the largest difference, relative to the output scale, exceeds ``tolerance``.
    """
    if isinstance(path, nn.Module):  # export_onnx takes (model, path): easily swapped
        raise ConfigError("verify_onnx takes (path, model, input_shape): the ONNX file first")
    _require_weights(model)
    check_input_channels(model, input_shape)
    runner = OnnxRuntimeModel(path)
    if batch_sizes is None:
        batch_sizes = (1, 2) if runner.batch_size is None else (runner.batch_size,)
    reference = copy.deepcopy(model).eval()
    dtype, device = dtype_and_device(reference)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = reference(x.to(device=device, dtype=dtype)).cpu()
        if not torch.isfinite(expected).all():
            # Not the export's fault, and nothing a comparison could verify.
            raise DeployError(
                "the model itself outputs NaN or infinity on random inputs: its weights are "
                "damaged or diverged; there is nothing trustworthy to export"
            )
        actual = runner.run(x)
        difference = relative_difference(actual, expected)
        # max() would pass NaN over (max(0.0, nan) is 0.0): a non-finite output never matches.
        worst = max(worst, difference if math.isfinite(difference) else math.inf)
    check = OnnxCheck(str(path), list(batch_sizes), worst, tolerance)
    if not check.passed:
        raise DeployError(
            f"{path}: ONNX Runtime output differs from PyTorch by {worst:.2e} (relative), "
            f"more than {tolerance:.0e}; the export is not trustworthy"
        )
    return check


_SCRATCH: list[Any] = []


def _scratch_dir() -> Path:
    # One temporary directory per process for exports nobody asked to keep (benchmarks, int8
    # without a path); removed when the process exits.
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="resunit-deploy-"))
    return Path(_SCRATCH[0].name)


__all__ = [
    "ONNX_INPUT_NAME",
    "ONNX_OPSET",
    "ONNX_OUTPUT_NAME",
    "ONNX_TOLERANCE",
    "OnnxCheck",
    "OnnxRuntimeModel",
    "export_onnx",
    "onnx_available",
    "onnxruntime_session",
    "require_onnx",
    "verify_onnx",
]
