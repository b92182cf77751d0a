"""The fast float32 model: :func:`optimize` folds, lays out and compiles a network.

The compilers are inductor (``torch.compile`` with freezing) and oneDNN Graph (a TorchScript
trace whose conv + add + ReLU chains oneDNN fuses), each checked here to work on this machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from resunit.blocks import PadShortcut
from resunit.deploy.cache_pieces import SPLIT_FROM_CACHES, cache_sized_batch
from resunit.deploy.folding import fold_batchnorm, relative_difference
from resunit.deploy.module_surgery import has_hooks, replace_modules
from resunit.deploy.native_build import load_onednn_plan_library
from resunit.deploy.onednn_plan import OneDnnPlan, check_plan_supported
from resunit.errors import ConfigError, first_line
from resunit.models import ResNet, dtype_and_device


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


COMPILERS = ("inductor", "onednn_graph", "onednn_plan")


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
    - ``"onednn_plan"``: the layers as oneDNN primitives called in a row from C, with no
      framework between them (see :class:`OneDnnPlanModel`; needs the ``onednn`` extra and a
      C++ compiler). Fastest where layers are small: ResNet-20 at batch 1.

    The original model is not modified; outputs match its eval-mode outputs to ~1e-6.
    """
    compiler = _compiler(compile)
    folded = fold_batchnorm(model)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    if compiler in ("onednn_graph", "onednn_plan"):
        # folded is already optimize's own copy: no second one.
        folded = _pad_shortcuts_as_convolutions_in_place(folded)
        if compiler == "onednn_plan":
            return OneDnnPlanModel(folded, channels_last).eval()
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

    return replace_modules(model, PadShortcut, convolution)


def _pad_as_convolution(pad: PadShortcut, dtype: torch.dtype, device: torch.device) -> nn.Conv2d:
    out_channels = pad.in_channels + pad.extra_channels
    conv = nn.Conv2d(pad.in_channels, out_channels, 1, pad.stride, bias=False)
    conv = conv.to(device=device, dtype=dtype)
    kept = torch.arange(min(pad.in_channels, out_channels))  # a negative pad drops channels
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[kept, kept] = 1.0  # output channel i ← input channel i
    return conv


class PerShapeModel(InferenceModel):
    """A folded model compiled once per input shape and thread count, on first use.

    The bookkeeping that :class:`OneDnnGraphModel` (a TorchScript trace) and
    :class:`OneDnnPlanModel` (a plan of oneDNN primitives) share; subclasses say in
    :meth:`_build` what one shape's compiled graph is.

    Each input shape (with its strides, dtype and device) and torch thread count gets its own
    graph, built on the first call with that shape and warm before that call returns, so the
    first result already comes from it. The first :data:`MAX_ONEDNN_GRAPHS` of these are built;
    later ones run the folded model eagerly (with a warning, once, and without waiting for
    other threads' builds): each trace took ~55 MB more memory for a ResNet-50 (each plan
    110-140 MB), and in a test during review a dropped trace's memory did not come back (~13
    MB per ResNet-20 trace, after gc and malloc_trim), so a model fed ever-new shapes must stop
    building rather than replace old graphs.

    A batch whose residual units' tensors would fill the CPU's last-level cache four times
    over runs in even, cache-sized pieces (:mod:`~resunit.deploy.cache_pieces`), each built
    like any other shape: ResNet-50 at batch 32 goes through memory in pieces of 4 on a 32 MB
    L3, 2-4% faster than whole. ``split_large_batches = False`` (on the class or one model)
    turns this off.

    Threads: calling it from several threads at once is safe, first calls included: one
    thread builds a shape while the others wait, and a graph is published only when warm.
    """

    # Whether large batches run in cache-sized pieces (off only to measure what it gains, in
    # benchmarks/onednn_graph_choices.py).
    split_large_batches: bool = True
    kind = "compiled"  # what the graphs are, for messages

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        super().__init__(model, channels_last)
        # (shape, strides, dtype, device, threads) → warm built graph, in the order first seen.
        self.graphs: dict[tuple[Any, ...], Callable[[Tensor], Tensor]] = {}
        # (image shape, dtype, device) → the largest batch run in one piece (None: any).
        self.piece_sizes: dict[tuple[Any, ...], int | None] = {}
        self._warned_unbuilt = False

    def forward(self, x: Tensor) -> Tensor:
        # Converted here, not in the trace: given an NCHW input, oneDNN Graph reorders it
        # itself, 4x slower than PyTorch for ResNet-50's 224x224 images (128 vs 29 µs at batch
        # 1, 2.7 vs 1.1 ms at batch 32; a wash for ResNet-20's 32x32 ones).
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # (Pieces hold at least one image: smaller batches skip the lookup, batch 1 above all.)
        split = self.split_large_batches and len(x) >= SPLIT_FROM_CACHES
        piece = self._piece_size(x) if split else None
        if piece is not None and len(x) >= SPLIT_FROM_CACHES * piece:
            # Pieces as even as can be (sizes differ by at most one): at most two traces. A
            # plain loop, not a comprehension: on Python < 3.12 that is one more frame between
            # the caller and _warn_unbuilt's stacklevel.
            outputs = []
            for part in x.tensor_split(math.ceil(len(x) / piece)):
                outputs.append(self._run(part))
            return torch.cat(outputs)
        return self._run(x)

    def _piece_size(self, x: Tensor) -> int | None:
        """How many images of ``x``'s shape run together so that a residual unit's tensors stay
        in the last-level cache (``cache_sized_batch``); None where any number may."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key in self.piece_sizes:
            return self.piece_sizes[key]
        # Once every trace place is taken, pieces could not be traced: run whole, and without
        # waiting for the lock, as untraced calls never do.
        if len(self.graphs) >= MAX_ONEDNN_GRAPHS:
            return None
        with _FIRST_CALL_LOCK, torch.no_grad():
            # Measuring adds hooks to the model for a moment. No other thread runs the model
            # itself then: calls do so only once every trace place is taken, and only this
            # lock takes places.
            if key not in self.piece_sizes and len(self.graphs) < MAX_ONEDNN_GRAPHS:
                self.model.eval()
                self.piece_sizes[key] = cache_sized_batch(self.model, x[:1])
            return self.piece_sizes.get(key)

    def _run(self, x: Tensor) -> Tensor:
        # oneDNN Graph compiles its partitions for the thread count of the trace, and they keep
        # it: traced on one thread and called on two, a ResNet-20 ran at one thread's speed
        # (425 vs 319 µs at batch 1); traced on two and called on one, it still used more
        # than one (354 µs against 422 for a trace on one). So each thread count gets its own.
        key = (*_input_signature(x), torch.get_num_threads())
        graph = self.graphs.get(key)
        with torch.no_grad():
            if graph is None and len(self.graphs) < MAX_ONEDNN_GRAPHS:
                graph = self._graph_for(x, key)  # None if other threads took the last places
            if graph is None:
                self._warn_unbuilt()
                return self.model(x)
            return graph(x)

    def _graph_for(self, x: Tensor, key: tuple[Any, ...]) -> Callable[[Tensor], Tensor] | None:
        with _FIRST_CALL_LOCK:
            graph = self.graphs.get(key)  # another thread may have built it while we waited
            if graph is not None or len(self.graphs) >= MAX_ONEDNN_GRAPHS:
                return graph
            self.model.eval()  # before anything runs it: BatchNorm must not update statistics
            graph = self._build(x)
            self.graphs[key] = graph
            return graph

    def _build(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The warm graph for inputs like ``x`` (the model is in eval mode)."""
        raise NotImplementedError

    def _warn_unbuilt(self) -> None:
        # Unlocked: two threads may both warn once; unbuilt calls never wait for a build.
        if not self._warned_unbuilt:
            self._warned_unbuilt = True
            warnings.warn(
                f"this {self.kind} model has built {MAX_ONEDNN_GRAPHS} graphs for input shapes "
                "and thread counts (MAX_ONEDNN_GRAPHS); further ones run the folded model unfused",
                # Points at the caller's line: here ← _run ← forward ← Module._call_impl ←
                # Module._wrapped_call_impl ← the caller.
                stacklevel=6,
            )


MAX_ONEDNN_GRAPHS = 8
"""How many (input shape, thread count) pairs one :class:`PerShapeModel` builds a graph for
(a oneDNN Graph trace, a oneDNN plan); later ones run eagerly."""


class OneDnnGraphModel(PerShapeModel):
    """A folded model traced to TorchScript, frozen, and run with oneDNN Graph fusion.

    oneDNN Graph ("LLGA") takes the whole traced graph, groups conv + bias + residual add +
    ReLU into compiled partitions and keeps tensors in oneDNN's blocked layouts between them.
    Each partition is then one cached call, whereas every convolution that inductor emits goes
    through PyTorch's generic oneDNN operator, which costs ~30 µs of CPU per call beyond the
    kernel (profiled at ResNet-20 batch 1: ~53 µs per conv call, of which oneDNN reports
    ~20 µs executing): at batch 1 that overhead is most of a ResNet-20's time.

    One trace per input shape and thread count (:class:`PerShapeModel`). Knowing the shape
    lets a plain ResNet's pool + classifier head run as one convolution there
    (``_HeadAsConvolution`` in this module). PyTorch has deprecated TorchScript;
    :func:`onednn_graph_works` says whether this still works in the installed version.

    oneDNN fusion is a process-wide TorchScript switch. It is on only while a shape is traced
    and warmed up: a warm graph keeps its fused plan with the switch off. Holding it on around
    every call instead (thread-safely, as this class did before) cost 10% at ResNet-20 batch 1
    and 4% at batch 32: removing it made those calls that much faster
    (``benchmarks/onednn_graph_choices.py``). Other TorchScript code compiling while a shape is
    traced sees the switch on.
    """

    # Whether a ResNet's head is traced as one convolution (off only to measure what it
    # gains, in benchmarks/onednn_graph_choices.py).
    head_as_convolution: bool = True
    kind = "oneDNN Graph"

    def _build(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The warm graph for inputs like ``x`` (the model is in eval mode)."""
        with _onednn_fusion():
            model = self.model
            if self.head_as_convolution:
                model = _head_as_convolution(model, x, self.channels_last)
            graph = _trace_and_freeze(model, x)
            # The profiling executor fuses after its profiled runs: do them now.
            for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
                graph(x)
        return graph


class OneDnnPlanModel(PerShapeModel):
    """A folded model run as a plan of oneDNN primitives per input shape and thread count.

    The same bookkeeping as :class:`OneDnnGraphModel` (:class:`PerShapeModel`: one plan per
    shape and thread count, built on the first call and shared by threads; large batches in
    cache-sized pieces), but instead of a TorchScript trace each shape gets a
    :class:`~resunit.deploy.OneDnnPlan`: the layers' primitives created once and executed in a
    row from one C call, without PyTorch between them. Sampled on 2 cores, a ResNet-20 forward
    at batch 1 took 257 µs so against 334 µs as the oneDNN Graph trace (BENCHMARKS.md). One
    call at a time runs each plan (its buffers are shared); calls from several threads take
    turns. Each plan keeps its own copy of the weights in oneDNN's layouts and its buffers:
    a ResNet-50 took 110 MB more memory for its plan at batch 1, 142 MB more for batch 2.

    Inside, oneDNN picks its own (blocked) layouts; ``channels_last`` says which layout the
    first convolution reads. With NHWC a ResNet-50 forward at 224×224 and batch 1 took 17.5 ms
    against 19.6 ms with NCHW (conversion included), a ResNet-20's at 32×32 211 µs against 203
    (ad-hoc timings, 2 cores).
    """

    kind = "oneDNN plan"

    def __deepcopy__(self, memo: dict[int, Any]) -> OneDnnPlanModel:
        # A plan holds C pointers, which cannot be copied: the copy builds its own plans on
        # its first calls (deploy steps deep-copy the models they are given).
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            copied = {} if name == "graphs" else copy.deepcopy(value, memo)
            object.__setattr__(clone, name, copied)
        return clone

    def __init__(self, model: nn.Module, channels_last: bool) -> None:
        # Refused now rather than on the first call: no oneDNN or compiler, or a layer a plan
        # cannot run (what depends on the input's shape can only be checked with one).
        load_onednn_plan_library()
        check_plan_supported(model)
        super().__init__(model, channels_last)

    def _build(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        return OneDnnPlan(self.model, x)


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
        and not any(has_hooks(m) for m in (model, model.avgpool, model.fc))
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
        return False, f"{type(exc).__name__}: {first_line(exc)}"[:200]
    return True, ""


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
        return False, f"{type(exc).__name__}: {first_line(exc)}"[:200]
    return True, ""


__all__ = [
    "COMPILERS",
    "COMPILE_OPTIONS",
    "MAX_ONEDNN_GRAPHS",
    "InferenceModel",
    "OneDnnGraphModel",
    "OneDnnPlanModel",
    "PerShapeModel",
    "compile_works",
    "onednn_graph_works",
    "optimize",
    "pad_shortcuts_as_convolutions",
]
