"""The inference path: BN folding, fused layouts, ONNX export, int8, and throughput measurement.

Everything here returns *new* modules and leaves the trained model untouched, and every
transformation is checked against the model it came from: a faster network is only useful if
it computes the same function.

Threads: the inference models (:class:`InferenceModel`, :class:`OneDnnGraphModel`,
:class:`OnnxRuntimeModel`) may be called from several threads at once; building them
(:func:`optimize`, :func:`export_onnx`, :func:`quantize` …) is meant for one thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import io
import itertools
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.allocator import retain_freed_memory as retain_freed_memory  # also for training
from resunit.analysis import check_input_channels as check_input_channels  # one shape check
from resunit.analysis import count_multiply_adds as count_multiply_adds  # one MAC counter
from resunit.analysis import image_batches, shape_text
from resunit.analysis import parse_input_shape as parse_input_shape  # one --input parser
from resunit.blocks import (
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    PreActUnit,
)
from resunit.errors import ConfigError, DeployError
from resunit.models import ResNet, dtype_and_device
from resunit.outputs import atomic_output, check_output_location, reason

# --- BatchNorm folding -----------------------------------------------------------------------

# Every BatchNorm flavour (BatchNorm2d, SyncBatchNorm …): in eval mode all are the same
# per-channel affine map of the running statistics.
_BatchNorm = nn.modules.batchnorm._BatchNorm

# Which BatchNorm follows which convolution, by unit type. Pre-activation units normalise their
# *input* (BN → ReLU → conv), so their first BN follows an addition, not a conv, and stays.
# A subclass folds as the nearest of these classes among its bases (see _conv_bn_pairs).
_CONV_BN_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    PreActBasicBlock: (("conv1", "bn2"),),
    PreActBottleneck: (("conv1", "bn2"), ("conv2", "bn3")),
}


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A new convolution computing ``bn(conv(x))`` with BN in eval mode (running statistics).

    ``bn(y) = γ (y − μ) / √(σ² + ε) + β`` is a per-channel affine map, so it scales the
    conv's output filters and shifts its bias. The arithmetic runs in float64 so that folding
    adds no rounding beyond the final cast.
    """
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ConfigError("cannot fold a BatchNorm without running statistics into a conv")
    dtype = conv.weight.dtype
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)

    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=dtype,
    )
    with torch.no_grad():
        weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        fused.weight.copy_(weight.to(dtype))
        fused.bias.copy_(((bias - mean) * scale + beta).to(dtype))
    return fused


def _fold_pairs(module: nn.Module, pairs: Iterable[tuple[str, str]]) -> int:
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
            setattr(module, conv_name, fold_conv_bn(conv, bn))
            # Identity keeps the module's forward unchanged: it still calls self.bnN(out).
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def _fold_sequential(seq: nn.Sequential) -> int:
    # Projection shortcuts: Sequential(conv1x1, BN) or Sequential(AvgPool, conv1x1, BN).
    folded = 0
    names = list(seq._modules)
    for first, second in itertools.pairwise(names):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm):
            seq._modules[first] = fold_conv_bn(conv, bn)
            seq._modules[second] = nn.Identity()
            folded += 1
    return folded


def _conv_bn_pairs(module: nn.Module) -> tuple[tuple[str, str], ...]:
    # The most specific known class among the module's bases: a subclass of BasicBlock folds
    # as a BasicBlock (an exact type match would leave all its BNs unfolded).
    for cls in type(module).__mro__:
        if cls in _CONV_BN_PAIRS:
            return _CONV_BN_PAIRS[cls]
    return ()


def _batchnorms_after_additions(model: nn.Module) -> set[int]:
    # The BNs no conv precedes, kept by design (ids): a pre-activation unit's input BN and a
    # pre-activation network's final_bn.
    kept = set()
    for module in model.modules():
        if isinstance(module, PreActUnit):
            kept.add(id(module.bn1))
        if isinstance(module, ResNet) and module.preactivation:
            kept.add(id(getattr(module, "final_bn", None)))
    return kept


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that follows a conv folded into it.

    Covers the stem, the units of :mod:`resunit.blocks` and their subclasses (every
    post-activation unit; the convs of pre-activation units that a BN follows) and every
    conv → BN pair inside an ``nn.Sequential``, such as projection shortcuts (``downsample``).
    Any BatchNorm flavour folds (``BatchNorm2d``, ``SyncBatchNorm``). BNs that follow an
    addition (the first BN of a pre-activation unit, ``final_bn``) cannot be folded into a
    conv and are kept. A BN in a place it does not know (a custom layer) is kept too, and a
    warning says how many: the copy still computes the same function, only less fused.
    The original model is not modified. The copy is for inference only: its BNs are gone.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in list(folded.modules()):
        if isinstance(module, ResNet) and not module.preactivation:
            count += _fold_pairs(module, [("conv1", "bn1")])
        count += _fold_pairs(module, _conv_bn_pairs(module))
        if isinstance(module, nn.Sequential):
            count += _fold_sequential(module)
    folded.folded_batchnorms = count  # type: ignore[assignment]  # for reports and tests
    kept = _batchnorms_after_additions(folded)
    left = [
        name or type(module).__name__
        for name, module in folded.named_modules()
        if isinstance(module, _BatchNorm) and id(module) not in kept
    ]
    if left:
        shown = ", ".join(left[:3]) + (", …" if len(left) > 3 else "")
        warnings.warn(
            f"fold_batchnorm left {len(left)} BatchNorm layer(s) unfolded ({shown}): it folds "
            "the units of resunit.blocks (and subclasses) and conv→BN pairs in nn.Sequential "
            "only; the copy computes the same function, with those BNs still in it",
            stacklevel=2,
        )
    return folded


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """``max |actual − expected| / max |expected|``: error relative to the output's scale.

    Elementwise relative error is meaningless for logits near zero; the scale of the whole
    output is what a 1e-5 float32 tolerance is about.
    """
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((actual - expected).abs().max() / scale)


# --- the fast float32 model ------------------------------------------------------------------


class InferenceModel(nn.Module):
    """A model wrapped for inference: no autograd, and its input in the layout it runs fastest in.

    Converting the input to channels_last inside ``forward`` means callers keep passing plain
    NCHW tensors; the convolutions then never have to reorder their inputs.

    Threads: calling it from several threads at once is safe, the first calls included. The
    first call for each input shape, dtype, strides and device (the one that compiles) runs
    while no other model's first call does, so a shape is compiled once. A compiled model
    needs inductor settings during its calls: torch 2.13 keeps them per thread, so each call
    sets its own; older versions keep them in one process-wide dict, where they are switched
    on while any call that needs them runs and back off after the last one (calls needing
    other settings, a PT2E int8 model's, then wait for each other, and other ``torch.compile``
    work in the process sees the settings meanwhile). Not safe while calls run: changing
    ``channels_last`` or ``inductor_config``, ``.to()``, or loading weights into the model.
    """

    def __init__(
        self,
        model: nn.Module,
        channels_last: bool,
        inductor_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.inductor_config = dict(inductor_config or {})
        # (shape, strides, dtype, device) of the inputs already compiled for; see forward.
        self._compiled_for: set[tuple[Any, ...]] = set()

    def train(self, mode: bool = True) -> InferenceModel:
        # Inference only: the wrapped model stays in eval mode, and exported graphs (PT2E)
        # refuse train()/eval() altogether, so evaluation loops calling .eval() must not reach it.
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # A compiled model compiles on its first call for each input shape, so the inductor
        # settings must be in force during calls: torch.compile(options={"freezing": True})
        # is silently ignored in torch 2.13 (the generated code keeps plain convolutions),
        # as is patching them around inductor alone (Dynamo reads `freezing` while tracing).
        # They are set for every call, not only first ones, because Dynamo may recompile a
        # shape it has seen (after torch._dynamo.reset(), say).
        with torch.no_grad(), _inductor_patch(self.inductor_config):
            if not self.inductor_config:
                return self.model(x)
            key = _input_signature(x)
            if key in self._compiled_for:
                return self.model(x)
            # Concurrent first calls of one shape would each compile it (Dynamo compiles one
            # at a time, but the second does not look for the first one's result): they
            # take turns, and all but the first find the compiled graph.
            with _FIRST_CALL_LOCK:
                out = self.model(x)
                self._compiled_for.add(key)
            return out


def _input_signature(x: Tensor) -> tuple[Any, ...]:
    # What a compiled or traced graph is specialised to: a new one means a first call.
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


# One lock for the first calls (compilations, traces) of all models: they are rare, Dynamo
# compiles one at a time anyway, and a module-level lock keeps the models deep-copyable.
# Reentrant: a first call may run another model's first call inside it.
_FIRST_CALL_LOCK = threading.RLock()


class _SharedSetting:
    """A process-wide setting switched on while any thread needs it, off after the last one.

    Patching a global around each call is not thread-safe on its own: with two calls
    overlapping, the first to finish restores the old value under the second (which may then
    compile without it), and the second then restores the first's patch for good. Here the
    first caller in applies the value and the last one out undoes it; a caller that needs
    another value waits until nobody holds the current one. A thread that already holds the
    setting and nests a call needing another value runs with the held one (waiting would
    deadlock; every value used here only changes speed, never results).
    """

    def __init__(self, apply: Callable[[Any], Callable[[], None]]) -> None:
        self._apply = apply  # value → function that undoes it
        self._condition = threading.Condition()
        self._value: Any = None
        self._undo: Callable[[], None] | None = None
        self._users = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def hold(self, value: Any) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        with self._condition:
            while self._users and self._value != value and not depth:
                self._condition.wait()
            if not self._users:
                self._undo = self._apply(value)
                self._value = value
            self._users += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            with self._condition:
                self._users -= 1
                if not self._users:
                    undo, self._undo, self._value = self._undo, None, None
                    try:
                        if undo is not None:
                            undo()
                    finally:
                        self._condition.notify_all()


def _apply_inductor_config(config: dict[str, Any]) -> Callable[[], None]:
    # Plain assignments, undone by whichever thread leaves last: inductor's own patch()
    # must be exited by the thread that entered it.
    import torch._inductor.config as inductor_config

    before = {key: getattr(inductor_config, key) for key in config}
    for key, value in config.items():
        setattr(inductor_config, key, value)

    def undo() -> None:
        for key, value in before.items():
            setattr(inductor_config, key, value)

    return undo


_INDUCTOR_SETTINGS = _SharedSetting(_apply_inductor_config)


@functools.cache
def _inductor_config_is_per_thread() -> bool:
    """Whether a setting patched in one thread stays invisible to the others.

    torch 2.13 keeps inductor's settings in context variables (one value per thread); older
    versions in one process-wide dict. Found by trying rather than by version number: patch
    ``freezing`` and read it back from a fresh context.
    """
    import torch._inductor.config as inductor_config

    flipped = not inductor_config.freezing
    with inductor_config.patch(freezing=flipped):
        return contextvars.Context().run(lambda: inductor_config.freezing != flipped)


def _inductor_patch(config: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    if not config:
        return contextlib.nullcontext()
    if _inductor_config_is_per_thread():
        # Only this thread sees the patch: nothing shared, nothing to coordinate.
        import torch._inductor.config as inductor_config

        return inductor_config.patch(config)
    return _INDUCTOR_SETTINGS.hold(config)


# Inductor options for CPU inference. ``freezing`` turns the weights into constants so that
# inductor can pre-pack them for oneDNN and fuse conv+ReLU and conv+add+ReLU (the residual sum)
# into single kernels; without it a compiled ResNet is barely faster than eager on CPU.
# ``cpp_wrapper`` calls those kernels from generated C++ instead of Python: it removes a few
# microseconds per layer, which is 5-15% for ResNet-20 and at batch 1 (measured on 2 cores),
# at the price of a slower first call.
COMPILE_OPTIONS: dict[str, Any] = {"freezing": True, "cpp_wrapper": True}


COMPILERS = ("inductor", "onednn_graph")


def optimize(
    model: nn.Module,
    channels_last: bool = True,
    compile: bool | str = False,
) -> InferenceModel:
    """The fastest float32 inference version of ``model`` on the current device.

    Always folds BatchNorm into the convolutions (see :func:`fold_batchnorm`). With
    ``channels_last`` the weights and every input are NHWC, the layout oneDNN's direct
    convolutions use, which saves a reorder around every conv. ``compile`` picks a graph
    compiler that fuses each ReLU and each residual addition into the convolution before it:

    - ``True`` or ``"inductor"``: ``torch.compile`` with weight freezing (it compiles on the
      first call for each batch size, which takes seconds).
    - ``"onednn_graph"``: a frozen TorchScript trace run with oneDNN Graph fusion (see
      :class:`OneDnnGraphModel`). Far less framework overhead per layer: on 2 cores it was
      1.1-2.2× inductor at batch 1 and 1.0-1.1× at batch 32 (BENCHMARKS.md).

    The original model is not modified; outputs match its eval-mode outputs to ~1e-6.
    """
    compiler = _compiler(compile)
    folded = fold_batchnorm(model)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    if compiler == "onednn_graph":
        # folded is already optimize's own copy: no second one.
        folded = _pad_shortcuts_as_convolutions_in_place(folded)
        return OneDnnGraphModel(folded, channels_last).eval()
    if compiler == "inductor":
        # dynamic=False: one specialised graph per batch size, as a deployment uses.
        folded = torch.compile(folded, dynamic=False)
    return InferenceModel(folded, channels_last, COMPILE_OPTIONS if compiler else None).eval()


def _compiler(compile: bool | str) -> str | None:
    if compile is True:
        return "inductor"
    if compile is False or compile is None:
        return None
    if compile not in COMPILERS:
        raise ConfigError(f"unknown compiler {compile!r}: choose from {', '.join(COMPILERS)}")
    return str(compile)


def pad_shortcuts_as_convolutions(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which each option-A shortcut (:class:`PadShortcut`: strided
    subsampling, then zero channels appended) is the 1×1 convolution with the same stride that
    computes it: weight 1 from input channel i to output channel i, 0 everywhere else, no bias.
    For finite inputs the result is bitwise the same (only ones and zeros multiply); an inf
    would turn the appended channels into NaN (0 × inf) and −0.0 comes out as +0.0.

    For graph compilers: in a oneDNN Graph trace the slice and the pad are two framework calls
    outside any fused partition, whereas the convolution joins one (with the residual addition
    after it). ResNet-20 at batch 1 ran 6-10% faster so (2 threads, interleaved, in
    ``benchmarks/onednn_graph_choices.py``); at batch 32 it made no difference. The
    convolution costs (in × out) multiply-adds per output pixel, little next to the 3×3
    branch beside it.
    """

    return _pad_shortcuts_as_convolutions_in_place(copy.deepcopy(model))


def _pad_shortcuts_as_convolutions_in_place(model: nn.Module) -> nn.Module:
    def convolution(pad: nn.Module, parent: nn.Module) -> nn.Module:
        # The unit around the shortcut says where it computes (a model may mix dtypes).
        return _pad_as_convolution(pad, *dtype_and_device(parent))

    return _replace_modules(model, PadShortcut, convolution)


def _pad_as_convolution(pad: PadShortcut, dtype: torch.dtype, device: torch.device) -> nn.Conv2d:
    out_channels = pad.in_channels + pad.extra_channels
    conv = nn.Conv2d(pad.in_channels, out_channels, 1, pad.stride, bias=False)
    conv = conv.to(device=device, dtype=dtype)
    kept = torch.arange(min(pad.in_channels, out_channels))  # a negative pad drops channels
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[kept, kept] = 1.0  # output channel i ← input channel i
    return conv


def _replace_modules(
    model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module, nn.Module], nn.Module]
) -> nn.Module:
    """Replace, in place, every submodule of type ``kind`` by ``make(old, parent)`` and return
    the model (``model`` itself may be one: then ``make(model, model)``)."""
    if isinstance(model, kind):
        return make(model, model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child, parent))
    return model


class OneDnnGraphModel(InferenceModel):
    """A folded model traced to TorchScript, frozen, and run with oneDNN Graph fusion.

    oneDNN Graph ("LLGA") takes the whole traced graph, groups conv + bias + residual add +
    ReLU into compiled partitions and keeps tensors in oneDNN's blocked layouts between them.
    Each partition is then one cached call, whereas every convolution that inductor emits goes
    through PyTorch's generic oneDNN operator, which costs ~30 µs of CPU per call beyond the
    kernel (profiled at ResNet-20 batch 1: ~53 µs per conv call, of which oneDNN reports
    ~20 µs executing): at batch 1 that overhead is most of a ResNet-20's time.

    Each input shape (with its strides, dtype and device) and torch thread count gets its own
    trace, made on the first call with that shape and warmed up before that call returns, so
    the first result already comes from the fused graph. Knowing the shape lets a plain
    ResNet's pool + classifier head run as one convolution there (``_HeadAsConvolution`` in
    this module). The first :data:`MAX_ONEDNN_GRAPHS` of these are traced; later ones run the
    folded model eagerly (with a warning, once, and without waiting for other threads'
    traces): each trace took ~55 MB more memory for a ResNet-50, and in a test during review
    a dropped trace's memory did not come back (~13 MB per ResNet-20 trace, after gc and
    malloc_trim), so a model fed ever-new shapes must stop tracing rather than replace old
    traces.
    PyTorch has deprecated TorchScript; :func:`onednn_graph_works` says whether this still works
    in the installed version.

    oneDNN fusion is a process-wide TorchScript switch. It is on only while a shape is traced
    and warmed up: a warm graph keeps its fused plan with the switch off. Holding it on around
    every call instead (thread-safely, as this class did before) cost 10% at ResNet-20 batch 1
    and 4% at batch 32: removing it made those calls that much faster
    (``benchmarks/onednn_graph_choices.py``). Other TorchScript code compiling while a shape is
    traced sees the switch on.

    Threads: calling it from several threads at once is safe, first calls included: one
    thread traces and warms up a shape while the others wait, and a graph is published only
    when warm.
    """

    # Whether a ResNet's head is traced as one convolution (off only to measure what it gains,
    # in benchmarks/onednn_graph_choices.py).
    head_as_convolution: bool = True

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__(model, channels_last)
        # (shape, strides, dtype, device, threads) → warm traced graph, in the order first seen.
        self.graphs: dict[tuple[Any, ...], torch.jit.ScriptModule] = {}
        self._warned_untraced = False

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # oneDNN Graph compiles its partitions for the thread count of the trace, and they keep
        # it: traced on one thread and called on two, a ResNet-20 ran at one thread's speed
        # (425 vs 319 µs at batch 1); traced on two and called on one, it still used more
        # than one (354 µs against 422 for a trace on one). So each thread count gets its own.
        key = (*_input_signature(x), torch.get_num_threads())
        graph = self.graphs.get(key)
        with torch.no_grad():
            if graph is None and len(self.graphs) < MAX_ONEDNN_GRAPHS:
                graph = self._trace(x, key)  # None if other threads took the last places
            if graph is None:
                self._warn_untraced()
                return self.model(x)
            return graph(x)

    def _trace(self, x: Tensor, key: tuple[Any, ...]) -> torch.jit.ScriptModule | None:
        with _FIRST_CALL_LOCK:
            graph = self.graphs.get(key)  # another thread may have traced it while we waited
            if graph is not None or len(self.graphs) >= MAX_ONEDNN_GRAPHS:
                return graph
            self.model.eval()  # before anything runs it: BatchNorm must not update statistics
            with _onednn_fusion():
                model = self.model
                if self.head_as_convolution:
                    model = _head_as_convolution(model, x, self.channels_last)
                graph = _trace_and_freeze(model, x)
                # The profiling executor fuses after its profiled runs: do them now.
                for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
                    graph(x)
            self.graphs[key] = graph
            return graph

    def _warn_untraced(self) -> None:
        # Unlocked: two threads may both warn once; untraced calls never wait for a trace.
        if not self._warned_untraced:
            self._warned_untraced = True
            warnings.warn(
                f"this oneDNN Graph model has traced {MAX_ONEDNN_GRAPHS} input shapes and thread "
                "counts (MAX_ONEDNN_GRAPHS); further ones run the folded model unfused",
                # Points at the caller's line: here ← forward ← Module._call_impl ←
                # Module._wrapped_call_impl ← the caller.
                stacklevel=5,
            )


MAX_ONEDNN_GRAPHS = 8
"""How many (input shape, thread count) pairs one :class:`OneDnnGraphModel` traces; later
ones run eagerly."""


class _HeadAsConvolution(nn.Module):
    """A ResNet whose head (global average pool, then the linear classifier) runs as one
    convolution, for inputs whose last feature map is ``height`` × ``width``.

    Averaging over the map and then applying ``fc`` is the same linear map as a convolution
    whose kernel covers the whole map, with weight ``fc.weight / (height × width)`` at every
    position and ``fc``'s bias: equal up to float rounding. For oneDNN Graph that one
    convolution is one partition, where the pool ran outside any partition as several framework
    calls (a copy, a sum, a division; profiled) and the classifier as a partition of its own:
    ResNet-20 ran 7% faster so at batch 1 and 3% at batch 32
    (``benchmarks/onednn_graph_choices.py``). Shares the model's weights; adds the kernel.
    """

    def __init__(self, model: ResNet, height: int, width: int, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        fc = model.fc
        assert isinstance(fc, nn.Linear)
        # skip_init: no random initialisation (it would advance the global generator); every
        # value is set below.
        conv = torch.nn.utils.skip_init(
            nn.Conv2d,
            fc.in_features,
            fc.out_features,
            (height, width),
            device=fc.weight.device,
            dtype=fc.weight.dtype,
        )
        with torch.no_grad():
            kernel = fc.weight / (height * width)
            conv.weight.copy_(kernel[:, :, None, None].expand(-1, -1, height, width))
            conv.bias.copy_(fc.bias)
        self.conv = conv.to(memory_format=torch.channels_last) if channels_last else conv

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.conv(self.model.forward_features(x)), 1)


# The head convolution does height × width times the classifier's multiply-adds per image (and
# holds height × width times its weights). Up to 2**20 that is noise next to the network: 40,960
# for ResNet-20 (0.1% of its 41 M). ResNet-50's would be 100 M with 400 MB of weights: it keeps
# its pool.
_MAX_HEAD_CONVOLUTION_MACS = 2**20


def _head_as_convolution(model: nn.Module, x: Tensor, channels_last: bool) -> nn.Module:
    """``model`` (in eval mode) with its head as a :class:`_HeadAsConvolution` for input
    ``x``'s shape, or ``model`` itself where that would not compute the same or not pay off:
    another architecture, no classifier, a head, forward, pool or classifier of its own (a
    subclass), forward hooks on any of them, or a head convolution too large."""
    plain_resnet = (
        isinstance(model, ResNet)
        and type(model).forward is ResNet.forward
        and type(model).forward_head is ResNet.forward_head
        and type(model.avgpool) is nn.AdaptiveAvgPool2d
        and model.avgpool.output_size in (1, (1, 1))
        and type(model.fc) is nn.Linear
        and model.fc.bias is not None
        and not any(_has_hooks(m) for m in (model, model.avgpool, model.fc))
    )
    if not plain_resnet:
        return model
    with torch.no_grad():
        features = model.forward_features(x)
    if features.dim() != 4:
        return model
    height, width = features.shape[-2:]
    if model.fc.weight.numel() * height * width > _MAX_HEAD_CONVOLUTION_MACS:
        return model
    return _HeadAsConvolution(model, height, width, channels_last)


def _has_hooks(module: nn.Module) -> bool:
    # Hooks a rewritten head would skip: the module's own and the process-wide ones.
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
    )


def _apply_onednn_fusion(enabled: bool) -> Callable[[], None]:
    before = torch._C._jit_llga_enabled()
    torch.jit.enable_onednn_fusion(enabled)
    return lambda: torch.jit.enable_onednn_fusion(before)


_ONEDNN_FUSION = _SharedSetting(_apply_onednn_fusion)


def _onednn_fusion() -> contextlib.AbstractContextManager[Any]:
    # A process-wide switch: on only while a graph is traced and warmed up, so other
    # TorchScript code is unaffected the rest of the time. (torch.jit.fuser("fuser3") does the
    # same but warns about nvfuser on every call.)
    return _ONEDNN_FUSION.hold(True)


def _trace_and_freeze(model: nn.Module, example: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # "torch.jit.trace is deprecated": known, and checked by onednn_graph_works().
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        return torch.jit.freeze(torch.jit.trace(model.eval(), example))


def compile_works() -> tuple[bool, str]:
    """Whether ``torch.compile`` can build CPU kernels here (needs a C++ compiler), and why not."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) + 1)
        with torch.no_grad(), _inductor_patch(COMPILE_OPTIONS):
            fn(torch.randn(4))
    except Exception as exc:  # inductor fails with many types when no toolchain exists
        return False, f"{type(exc).__name__}: {_first_line(exc)}"[:200]
    return True, ""


def _first_line(exc: BaseException) -> str:
    # Third-party errors (inductor, TorchScript, ONNX Runtime) can run to pages; the first line
    # says what went wrong.
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def onednn_graph_works() -> tuple[bool, str]:
    """Whether oneDNN Graph fusion through TorchScript runs here, and why not."""
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN"
    try:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
        x = torch.randn(1, 3, 8, 8)
        fused = OneDnnGraphModel(net, channels_last=False)
        if relative_difference(fused(x), net(x)) > 1e-5:
            return False, "its output differs from the model's"
    except Exception as exc:  # TorchScript fails with many types once it is removed
        return False, f"{type(exc).__name__}: {_first_line(exc)}"[:200]
    return True, ""


# --- ONNX export -----------------------------------------------------------------------------

ONNX_INPUT_NAME = "input"
ONNX_OUTPUT_NAME = "logits"
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4


def _require_onnx() -> Any:
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
        _require_onnx()
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
    _require_onnx()
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
    ort = _require_onnx()
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
        raise DeployError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from None


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
                f"{_first_line(exc)}"
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


# --- int8 ------------------------------------------------------------------------------------


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
    _require_onnx()
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
    float_model = _replace_modules(float_model, nn.ReLU, lambda relu, parent: _FunctionalReLU())
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


_SCRATCH: list[Any] = []


def _scratch_dir() -> Path:
    # One temporary directory per process for exports nobody asked to keep (benchmarks, int8
    # without a path); removed when the process exits.
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="resunit-deploy-"))
    return Path(_SCRATCH[0].name)


# --- throughput ------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of running the same network: a name, what it is, and ``run(x) → logits``."""

    name: str
    description: str
    run: Callable[[Tensor], Tensor]
    input_layout: str = "nchw"
    # Its threads busy-wait after a call, taking the cores from whatever runs next; the
    # measurement pauses after it (see measure_interleaved).
    spinning: bool = False


VARIANTS = (
    "eager",
    "folded",
    "folded_cl",
    "compiled",
    "onednn_graph",
    "onnxruntime",
    "onnxruntime_spin",
    "int8",
    "int8_pt2e",
)
# What `resunit bench` compares by default: every float32 way of running the model.
FLOAT32_VARIANTS = VARIANTS[:7]
VARIANT_DESCRIPTIONS = {
    "eager": "PyTorch eager, NCHW float32, BatchNorm not folded",
    "folded": "BatchNorm folded into the convs, NCHW",
    "folded_cl": "BatchNorm folded, channels_last (NHWC)",
    "compiled": "folded + channels_last + torch.compile (freezing: fused conv+ReLU/add)",
    "onednn_graph": "folded + channels_last + TorchScript trace with oneDNN Graph fusion",
    "onnxruntime": "ONNX Runtime float32 on the exported folded graph",
    "onnxruntime_spin": "the same, worker threads spinning between ops (ORT's default)",
    "int8": "ONNX Runtime int8 (static, per-channel, QDQ)",
    "int8_pt2e": "PyTorch int8: PT2E X86 Inductor quantizer + torch.compile (torchao)",
}


def build_variants(
    model: nn.Module,
    input_shape: Sequence[int],
    names: Sequence[str] = FLOAT32_VARIANTS,
    *,
    threads: int | None = None,
    calibration_batches: Sequence[Tensor] | None = None,
) -> tuple[dict[str, Variant], dict[str, str]]:
    """Build the requested inference variants of ``model``; returns (variants, skipped→why).

    A variant that cannot run here (no ONNX extra, no compiler for ``torch.compile``) is
    skipped with its reason instead of failing the whole comparison.
    """
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(
            f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}"
        )
    eager = copy.deepcopy(model).eval()
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}

    def add(name: str, run: Callable[[Tensor], Tensor], spinning: bool | None = None) -> None:
        if spinning is None:  # a PyTorch variant
            spinning = openmp_threads_spin()
        variants[name] = Variant(name, VARIANT_DESCRIPTIONS[name], run, spinning=spinning)

    for name in names:
        if name == "eager":
            add(name, _no_grad(eager))
        elif name == "folded":
            add(name, optimize(eager, channels_last=False))
        elif name == "folded_cl":
            add(name, optimize(eager, channels_last=True))
        elif name == "compiled":
            works, why = compile_works()
            if works:
                add(name, optimize(eager, channels_last=True, compile=True))
            else:
                skipped[name] = f"torch.compile does not work here ({why})"
        elif name == "onednn_graph":
            works, why = onednn_graph_works()
            if works:
                add(name, optimize(eager, channels_last=True, compile="onednn_graph"))
            else:
                skipped[name] = f"oneDNN Graph fusion does not work here ({why})"
        elif name in ("onnxruntime", "onnxruntime_spin", "int8"):
            if not onnx_available():
                skipped[name] = "the [onnx] extra is not installed"
            elif name.startswith("onnxruntime"):
                path = _scratch_dir() / f"bench-{id(eager)}.onnx"
                if not path.exists():
                    export_onnx(eager, path, input_shape, dynamic_batch=True)
                spin = name == "onnxruntime_spin"
                add(name, OnnxRuntimeModel(path, threads, spin=spin), spinning=spin)
            elif calibration_batches is None:
                skipped[name] = "no calibration batches given"
            else:
                path = _scratch_dir() / f"bench-{id(eager)}.int8.onnx"
                add(name, quantize(eager, calibration_batches, path, threads=threads), False)
        elif name == "int8_pt2e":
            if not pt2e_available():
                skipped[name] = "torchao is not installed"
            elif calibration_batches is None:
                skipped[name] = "no calibration batches given"
            else:
                add(name, quantize_pt2e(eager, calibration_batches))
    return variants, skipped


def openmp_threads_spin() -> bool:
    """Whether PyTorch's OpenMP threads busy-wait after each parallel region, as GNU OpenMP's
    default wait policy has them do for a while (unless ``OMP_WAIT_POLICY=PASSIVE``).

    Like ONNX Runtime's spinning threads, they then take the cores from whatever runs next:
    in one process, ONNX Runtime at ResNet-20 batch 1 measured 2170 img/s when it always ran
    right after ``onednn_graph`` and 3190 when another variant came between (2026-11-29).
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def _no_grad(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x)

    return run


@dataclass
class Timing:
    """Repeated timings of one variant on one batch size."""

    name: str
    batch: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_seconds


def measure_interleaved(
    runners: dict[str, Callable[[], Any]],
    batch: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    block: int | dict[str, int] = 2,
    spinning: Iterable[str] = (),
) -> dict[str, Timing]:
    """Time every runner ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Each round runs every variant once, starting from a different one each round, so slow
    phases of a shared machine hit all variants alike; report medians and compare ratios.
    Within a round a variant runs ``block`` calls back to back (a number, or one per variant)
    and only the calls after the first are timed, their mean being the round's sample: the
    first one refills the caches and wakes the threads that the previous variant left cold,
    which would otherwise be charged to whichever variant comes next (a model in service runs
    call after call). Runners named in ``spinning`` keep their threads
    busy-waiting after a call, taking the cores from the next variant: a short pause follows
    their block (we measured the interference gone after 10-50 ms on 2 cores). That is ONNX
    Runtime with spinning threads and, by default, every PyTorch variant too
    (:func:`openmp_threads_spin`).
    """
    names = list(runners)
    blocks = block if isinstance(block, dict) else dict.fromkeys(names, block)
    if min(blocks.values()) < 2:
        raise ConfigError("block must be at least 2: its first call is never timed")
    spinning = set(spinning)
    timings = {name: Timing(name, batch) for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runners[name]()  # warms up, untimed
            start = time.perf_counter()
            for _ in range(blocks[name] - 1):
                runners[name]()
            elapsed = (time.perf_counter() - start) / (blocks[name] - 1)
            if round_index >= warmup:
                timings[name].seconds.append(elapsed)
            if name in spinning:
                time.sleep(0.1)
    return timings


def compare_variants(
    variants: dict[str, Variant],
    x: Tensor,
    reference: Tensor,
    *,
    repeats: int,
    warmup: int = 2,
    block_seconds: float = 0.05,
) -> tuple[dict[str, Timing], dict[str, float]]:
    """Time every variant on ``x`` (see :func:`measure_interleaved`) and check its output.

    Each variant's block holds as many calls as fill about ``block_seconds`` (2 to 21 calls):
    fast variants are timed over many consecutive calls, slow ones over one after a warm-up.
    Returns the timings and each variant's largest difference from ``reference`` relative to
    the output's scale. The output is taken from the first call, which compiles or plans and
    is never timed.
    """
    with torch.no_grad():
        differences = {n: relative_difference(v.run(x), reference) for n, v in variants.items()}
    runners = {name: (lambda v=v: v.run(x)) for name, v in variants.items()}
    blocks = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        per_call = time.perf_counter() - start
        blocks[name] = 1 + min(20, max(1, round(block_seconds / per_call)))
    spinning = [name for name, v in variants.items() if v.spinning]
    timings = measure_interleaved(
        runners, len(x), repeats=repeats, warmup=warmup, block=blocks, spinning=spinning
    )
    return timings, differences


__all__ = [
    "COMPILERS",
    "COMPILE_OPTIONS",
    "FLOAT32_VARIANTS",
    "MAX_ONEDNN_GRAPHS",
    "ONNX_INPUT_NAME",
    "ONNX_OPSET",
    "ONNX_OUTPUT_NAME",
    "ONNX_TOLERANCE",
    "VARIANTS",
    "VARIANT_DESCRIPTIONS",
    "DeployError",
    "InferenceModel",
    "OneDnnGraphModel",
    "OnnxCheck",
    "OnnxRuntimeModel",
    "Timing",
    "Variant",
    "build_variants",
    "check_input_channels",
    "compare_variants",
    "compile_works",
    "count_multiply_adds",
    "export_onnx",
    "fold_batchnorm",
    "fold_conv_bn",
    "measure_interleaved",
    "onednn_graph_works",
    "onnx_available",
    "onnxruntime_session",
    "openmp_threads_spin",
    "optimize",
    "pad_shortcuts_as_convolutions",
    "parse_input_shape",
    "pt2e_available",
    "quantize",
    "quantize_pt2e",
    "relative_difference",
    "retain_freed_memory",
    "verify_onnx",
]
