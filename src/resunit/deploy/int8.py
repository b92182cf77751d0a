"""Post-training static int8 quantization for x86 CPUs, calibrated on real batches.

Two maintained toolchains: ONNX Runtime's static quantizer (:func:`quantize`, a file to
ship) and PyTorch's PT2E X86 path through torchao (:func:`quantize_pt2e`, in-process).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.analysis import image_batches
from resunit.data import ImageDataset
from resunit.deploy.inference import InferenceModel
from resunit.deploy.module_surgery import replace_modules
from resunit.deploy.onnx_export import (
    ONNX_INPUT_NAME,
    OnnxRuntimeModel,
    _scratch_dir,
    export_onnx,
    require_onnx,
)
from resunit.errors import ConfigError, DeployError
from resunit.evaluation import prepare_batch


def calibration_sample(
    train_set: ImageDataset, batches: int, batch_size: int, input_size: int | None
) -> list[Tensor]:
    """Up to ``batches`` normalised batches of ``batch_size`` images for int8 calibration: a
    seeded sample of the training split, so every class and never a test image, and the same
    images each time."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    chosen = order[: batches * batch_size]
    return [
        prepare_batch(train_set.images[idx], train_set.mean, train_set.std, input_size)
        for idx in chosen.split(batch_size)
    ]


def quantize(
    model: nn.Module,
    calibration_batches: Iterable[Tensor],
    path: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    method: str = "percentile",
) -> OnnxRuntimeModel:
    """Post-training static int8 quantization for x86 CPUs, calibrated on ``calibration_batches``.

    The BN-folded model is exported to ONNX and quantized by ONNX Runtime's static quantizer:
    int8 weights per output channel, uint8 activations whose ranges come from the calibration
    batches (use real, normalised inputs: random ones give useless ranges). ``method``:
    ``percentile`` (default: the 99.999th percentile of each activation, which ignores the rare
    outliers that would waste the 256 levels; on ResNet-20/digits it lost no test image where
    ``minmax`` lost two), ``minmax`` or ``entropy``.
    Quantize/dequantize pairs (QDQ) around each conv are fused by ONNX Runtime into int8
    kernels that use AVX-512 VNNI. We chose ONNX Runtime over PyTorch's PT2E flow by
    measurement (BENCHMARKS.md), and because PT2E has moved out of ``torch`` into ``torchao``.

    Returns the int8 model, callable on float NCHW tensors; it is written to ``path`` (an
    ``.onnx`` file) or to a temporary directory that lives as long as the process.
    """
    require_onnx()
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise ConfigError(f"unknown calibration method {method!r}: choose {', '.join(methods)}")
    batches = [
        b.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for b in image_batches(calibration_batches, "quantize")
    ]
    if not batches:
        raise ConfigError("int8 quantization needs at least one calibration batch")
    input_shape = tuple(batches[0].shape[1:])
    if method != "minmax" and len({len(b) for b in batches}) > 1:
        # The histogram calibrators stack per-batch outputs and need equal batch sizes; a
        # short last batch is dropped (its images are a small fraction of the calibration set).
        size = len(batches[0])
        chunks = list(torch.cat(batches).split(size))
        batches = chunks[:-1] if len(chunks) > 1 and len(chunks[-1]) < size else chunks
    out = Path(path) if path is not None else _scratch_dir() / "model.int8.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as work_dir:
        _quantize_static(model, batches, input_shape, Path(work_dir), out, methods[method])
    return OnnxRuntimeModel(out, threads)


def _quantize_static(
    model: nn.Module,
    batches: list[Tensor],
    input_shape: tuple[int, ...],
    work: Path,
    out: Path,
    method: Any,
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path = export_onnx(model, work / "float.onnx", input_shape, dynamic_batch=True)
    prepared = work / "prepared.onnx"
    # Shape inference + graph cleanup first, as ONNX Runtime's quantization guide requires.
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self._it, None)
            return None if batch is None else {ONNX_INPUT_NAME: batch.numpy()}

    # The histogram calibrators print progress to stdout, which would corrupt `--json` output.
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(prepared),
            str(out),
            _Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
        )


class _FunctionalReLU(nn.Module):
    """``F.relu`` as a module. The units call one shared ``self.relu`` two or three times;
    PT2E's X86 quantizer groups the calls of one module into a single pattern and then
    refuses it ("more than one output node"); functional calls are matched one by one."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)


def pt2e_available() -> bool:
    """True when ``torchao`` (PyTorch's PT2E quantization, moved out of ``torch``) imports."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except Exception:  # ImportError, or a torchao built for another torch
        return False
    return True


def quantize_pt2e(model: nn.Module, calibration_batches: Iterable[Tensor]) -> nn.Module:
    """Post-training static int8 quantization in PyTorch itself (PT2E, X86 Inductor quantizer).

    The model is captured with ``torch.export`` (batch size left dynamic), observed on the
    calibration batches, converted to quantize/dequantize + float ops, and compiled with
    freezing so that inductor lowers each pattern to a oneDNN int8 convolution (VNNI/AMX).
    Needs ``torchao``; the first call compiles (tens of seconds for ResNet-50).

    The X86 quantizer targets CPUs and calibrates in float32, so a model in another dtype or
    on a GPU is quantized from a float32 CPU copy (as :func:`export_onnx` does); the result
    takes float32 CPU inputs. The model itself is not modified.
    """
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except Exception:
        raise DeployError("PT2E int8 needs torchao: pip install 'resunit[int8]'") from None
    batches = [
        b.detach().to(device="cpu", dtype=torch.float32)
        for b in image_batches(calibration_batches, "quantize_pt2e")
    ]
    if not batches:
        raise ConfigError("int8 quantization needs at least one calibration batch")
    float_model = copy.deepcopy(model).eval().to(device="cpu", dtype=torch.float32)
    float_model = replace_modules(float_model, nn.ReLU, lambda relu, parent: _FunctionalReLU())
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        graph = torch.export.export(
            float_model, (batches[0],), dynamic_shapes=({0: batch_dim},)
        ).module()
        quantizer = x86.X86InductorQuantizer()
        quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        for batch in batches:
            prepared(batch)
        converted = convert_pt2e(prepared)
    compiled = torch.compile(converted, dynamic=False)
    return InferenceModel(compiled, channels_last=False, inductor_config={"freezing": True})


__all__ = [
    "calibration_sample",
    "pt2e_available",
    "quantize",
    "quantize_pt2e",
]
