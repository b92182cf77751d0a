"""A folded network run as a plan of oneDNN primitives: no framework between the layers.

At ResNet-20's size a layer computes for ~10 µs, and PyTorch's oneDNN Graph bridge adds
~5 µs of serial work per layer around it (BENCHMARKS.md): at batch 1 that overhead decided
the race against ONNX Runtime. A plan (``native/onednn_plan.cpp``) creates each layer's
oneDNN primitive once, with its weights reordered to the layout the kernel wants and every
intermediate buffer laid out in advance, and a forward is then those primitives executed in
a row from one C call.

:class:`OneDnnPlan` reads the network from its ``torch.fx`` graph, specialised to one input
shape, and fuses as :class:`~resunit.deploy.OneDnnGraphModel` does: ReLU into the layer
before it, and a residual addition into the convolution that computes the residual
(oneDNN's sum post-op: the convolution adds its result into the shortcut's buffer, in place,
where nothing reads the shortcut afterwards). :class:`~resunit.deploy.OneDnnPlanModel` builds
a plan per input shape and thread count on first use.

What it runs, float32 on the CPU, in eval mode: convolutions (grouped, strided, dilated,
zero-padded), BatchNorm, ReLU, additions (one addend may broadcast), max and average pooling
(ceil_mode included), global average pooling, flatten of a pooled map, and linear layers on
its rows; Identity and Dropout pass their input on. That is every registered network once
BatchNorm is folded and option-A shortcuts are convolutions, as :func:`~resunit.deploy.optimize`
does. Anything else is refused with :class:`~resunit.errors.ConfigError`: the kinds of layer
when the model is wrapped, what depends on shapes when the first input arrives.
"""

from __future__ import annotations

import ctypes
import operator
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from resunit.deploy.folding import relative_difference
from resunit.deploy.module_surgery import has_hooks
from resunit.deploy.native_build import load_onednn_plan_library
from resunit.errors import ConfigError, first_line

_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# In eval mode these return their input (the plan refuses models in training mode).
_PASS_THROUGH_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_TAKES_RELU = ("conv", "batch_norm", "add", "linear")  # the layers that fuse a ReLU after them
# A plan differs from eager PyTorch by float32 rounding in another order (≤ 2e-6 relative in
# the tests, 110 layers deep); more than this is another function.
PLAN_TOLERANCE = 1e-4


@dataclass
class _Op:
    """One layer of the plan, on value numbers (0 is the input)."""

    kind: str  # conv, batch_norm, relu, add, max_pool, avg_pool, linear
    inputs: list[int]
    output: int
    module: nn.Module | None = None
    relu: bool = False  # a ReLU fused after it
    accumulate_into: int | None = None  # conv: the value it adds its result into, in place
    extra: dict[str, Any] = field(default_factory=dict)


class _Graph:
    """The model's fx graph as a list of :class:`_Op`, then fused.

    Without an example input only the kinds of layer are checked; with one, every shape too.
    """

    def __init__(self, model: nn.Module, example: Tensor | None) -> None:
        try:
            traced = torch.fx.symbolic_trace(model)
        except Exception as exc:  # fx raises several types for Python it cannot follow
            raise ConfigError(
                f"torch.fx cannot trace this model for a oneDNN plan "
                f"({type(exc).__name__}: {first_line(exc)}); use compile='onednn_graph'"
            ) from exc
        if has_hooks(model):  # fx calls the root's forward, never its hooks
            raise ConfigError("a oneDNN plan would skip the model's forward hooks")
        if example is not None:
            with torch.no_grad():
                # A copy: an in-place layer on the input must not change the caller's tensor.
                ShapeProp(traced).propagate(example.clone())
        self.modules = dict(traced.named_modules())
        self.ops: list[_Op] = []
        self.value_of: dict[torch.fx.Node, int] = {}
        self.nodes_of: dict[int, list[torch.fx.Node]] = {}  # a value's node and its aliases
        self.value_shape: dict[int, tuple[int, ...] | None] = {}
        self.output = -1
        self.output_shape: tuple[int, ...] | None = None
        for node in traced.graph.nodes:
            self._read(node)

    def _bind(self, node: torch.fx.Node, value: int) -> None:
        self.value_of[node] = value
        self.nodes_of.setdefault(value, []).append(node)

    def _emit(self, kind: str, node: torch.fx.Node, inputs: list[Any], **kwargs: Any) -> None:
        values = [self.value_of[arg] for arg in inputs]
        output = len(self.nodes_of)
        self.ops.append(_Op(kind, values, output, **kwargs))
        self.value_shape[output] = _shape(node)
        self._bind(node, output)

    def _alias(self, node: torch.fx.Node, source: torch.fx.Node) -> None:
        self._bind(node, self.value_of[source])

    def _read(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            if self.nodes_of:
                raise ConfigError("a oneDNN plan takes one input tensor")
            self._bind(node, 0)
            self.value_shape[0] = _shape(node)
        elif node.op == "output":
            if not isinstance(node.args[0], torch.fx.Node):
                raise ConfigError("a oneDNN plan returns one tensor")
            self.output = self.value_of[node.args[0]]
            self.output_shape = _shape(node.args[0])
        elif node.op == "call_module":
            module = self.modules[str(node.target)]
            if has_hooks(module):  # eager PyTorch would run them; the plan cannot
                raise ConfigError(f"a oneDNN plan would skip the forward hooks on {node.target}")
            if len(node.args) != 1 or node.kwargs:
                raise _unsupported(node, f"{type(module).__name__} called with other arguments")
            self._read_module(node, module, node.args[0])
            if isinstance(module, nn.ReLU) and module.inplace:
                self._in_place(node, node.args[0])
        elif node.op == "call_function":
            self._read_function(node, node.target, list(node.args), dict(node.kwargs))
        elif node.op == "call_method":
            self._read_method(node)
        else:
            raise _unsupported(node)

    def _in_place(self, node: torch.fx.Node, changed: Any) -> None:
        """After an in-place layer, every name of its input (the node and its aliases: views
        of the whole tensor) holds the layer's result, in eager PyTorch as here: readers after
        it read the new value. (The caller's input tensor itself is never written.)

        fx records only the in-place calls it sees: ``x.add_(y)``, ``torch.relu_(x)``,
        ``ReLU(inplace=True)``. ``x += y`` reaches it as an ordinary addition, so a model
        that reads ``x`` under another name afterwards differs from its graph; the check
        against the model itself when a plan is built (:class:`OneDnnPlan`) catches that."""
        old = self.value_of[changed]
        new = self.value_of[node]
        for other in self.nodes_of[old]:
            self._bind(other, new)

    def _read_module(self, node: torch.fx.Node, module: nn.Module, source: Any) -> None:
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ConfigError(f"a oneDNN plan needs explicit zero padding ({node.target})")
            self._emit("conv", node, [source], module=module)
        elif isinstance(module, nn.BatchNorm2d):
            if module.running_mean is None or module.running_var is None:
                raise ConfigError(f"a oneDNN plan needs BatchNorm statistics ({node.target})")
            self._emit("batch_norm", node, [source], module=module)
        elif isinstance(module, nn.ReLU):
            self._emit("relu", node, [source])
        elif isinstance(module, nn.MaxPool2d):
            if module.return_indices or _pair(module.dilation) != (1, 1):
                raise ConfigError(f"a oneDNN plan pools without dilation ({node.target})")
            self._emit("max_pool", node, [source], module=module, extra=_window(module, source))
        elif isinstance(module, nn.AvgPool2d):
            # oneDNN averages over the cells inside the image, PyTorch's count_include_pad=False;
            # without padding the two counts agree (ceil_mode's overhang counts in neither).
            counts_padding = module.count_include_pad and _pair(module.padding) != (0, 0)
            if counts_padding or module.divisor_override is not None:
                raise ConfigError(
                    f"a oneDNN plan averages over the image only ({node.target}: set "
                    "count_include_pad=False)"
                )
            self._emit("avg_pool", node, [source], module=module, extra=_window(module, source))
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise ConfigError(f"a oneDNN plan pools to 1×1 only ({node.target})")
            self._emit("avg_pool", node, [source], extra=_global_window(source))
        elif isinstance(module, nn.Linear):
            # PyTorch applies Linear to the last dimension of any tensor; the plan to rows.
            shape = _shape(source)
            if shape is not None and (len(shape) != 2 or shape[1] != module.in_features):
                raise ConfigError(
                    f"a oneDNN plan applies Linear to (n, features) rows only ({node.target} "
                    f"gets {tuple(shape)}): flatten a pooled map first"
                )
            self._emit("linear", node, [source], module=module)
        elif isinstance(module, _PASS_THROUGH_MODULES) or (
            isinstance(module, nn.Flatten)
            and _flattens_pooled_map(source, module.start_dim, module.end_dim)
        ):
            self._alias(node, source)
        else:
            raise _unsupported(node, type(module).__name__)

    def _read_function(
        self, node: torch.fx.Node, function: Any, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        if function in _RELU_FUNCTIONS and len(args) == 1 and set(kwargs) <= {"inplace"}:
            self._emit("relu", node, args)
            if function is torch.relu_ or kwargs.get("inplace"):
                self._in_place(node, args[0])
        elif function in _ADD_FUNCTIONS and len(args) == 2 and not kwargs:
            if not all(isinstance(arg, torch.fx.Node) for arg in args):
                raise _unsupported(node, "an addition of a constant")
            self._emit("add", node, _full_size_first(node, args))
            if function is operator.iadd:
                self._in_place(node, args[0])
        elif function is torch.flatten and set(kwargs) <= {"start_dim", "end_dim"}:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            if not _flattens_pooled_map(args[0], start, end):
                raise _unsupported(node, "a flatten of anything but a pooled (n, c, 1, 1) map")
            self._alias(node, args[0])
        else:
            raise _unsupported(node)

    def _read_method(self, node: torch.fx.Node) -> None:
        args, kwargs = list(node.args), dict(node.kwargs)
        if node.target in ("relu_", "add_"):  # torch.relu_ and operator.iadd: in place
            function = torch.relu_ if node.target == "relu_" else operator.iadd
            self._read_function(node, function, args, kwargs)
        elif node.target in ("relu", "add", "flatten"):
            function = {"relu": torch.relu, "add": operator.add, "flatten": torch.flatten}
            self._read_function(node, function[str(node.target)], args, kwargs)
        elif node.target == "contiguous" and len(args) == 1:
            self._alias(node, args[0])
        else:
            raise _unsupported(node)

    def fuse(self) -> list[_Op]:
        """Fold each ReLU and each residual addition into the layer that computes its input."""
        readers: dict[int, list[int]] = {}
        for index, op in enumerate(self.ops):
            for value in op.inputs:
                readers.setdefault(value, []).append(index)
        readers.setdefault(self.output, []).append(len(self.ops))  # the caller reads it last
        producer = {op.output: index for index, op in enumerate(self.ops)}
        alias: dict[int, int] = {}
        kept: list[_Op] = []
        for index, op in enumerate(self.ops):
            if op.kind == "add" and self._fuse_addition(index, op, readers, producer, alias):
                continue
            if op.kind == "relu":
                (source,) = op.inputs
                before = self.ops[producer[source]] if source in producer else None
                fusable = before is not None and before.kind in _TAKES_RELU and not before.relu
                if fusable and readers[source] == [index]:
                    before.relu = True
                    alias[op.output] = _resolve(alias, source)
                    continue
            op.inputs = [_resolve(alias, value) for value in op.inputs]
            kept.append(op)
        self.output = _resolve(alias, self.output)
        return kept

    def _fuse_addition(
        self,
        index: int,
        add: _Op,
        readers: dict[int, list[int]],
        producer: dict[int, int],
        alias: dict[int, int],
    ) -> bool:
        """Let the convolution computing one addend add into the other addend's buffer."""
        for conv_value, other in (add.inputs, add.inputs[::-1]):
            conv_index = producer.get(conv_value)
            if conv_index is None:
                continue
            conv = self.ops[conv_index]
            other_index = producer.get(other, -1)  # -1: the plan's input
            in_place = (
                conv.kind == "conv"
                # The sum has the convolution's shape: a broadcast addend has not.
                and self.value_shape[conv_value] == self.value_shape[other]
                and not conv.relu
                and conv.accumulate_into is None
                and readers[conv_value] == [index]
                # The other addend exists when the convolution runs, is not the caller's
                # input tensor, and nothing reads it between the convolution and the sum.
                and 0 <= other_index < conv_index
                and all(r < conv_index or r == index for r in readers[other])
            )
            if in_place:
                conv.accumulate_into = _resolve(alias, other)
                conv.output = conv.accumulate_into
                producer[add.output] = conv_index
                alias[add.output] = conv.accumulate_into
                # Readers of the sum read the other addend's buffer from here on.
                return True
        return False


def _resolve(alias: dict[int, int], value: int) -> int:
    while value in alias:
        value = alias[value]
    return value


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None else None


def _window(pool: nn.MaxPool2d | nn.AvgPool2d, source: Any) -> dict[str, Any]:
    """A pooling window as oneDNN takes it: ceil_mode's extra output row and column become
    padding after the image, so that both libraries give the same output size."""
    kernel, padding = _pair(pool.kernel_size), _pair(pool.padding)
    stride = _pair(pool.stride) if pool.stride is not None else kernel
    shape = _shape(source)
    if shape is None:  # only checking what the model holds
        return {}
    after = []
    for size, k, s, p in zip(shape[2:], kernel, stride, padding, strict=True):
        span = size + 2 * p - k
        out = (-(-span // s) if pool.ceil_mode else span // s) + 1
        if pool.ceil_mode and (out - 1) * s >= size + p:
            out -= 1  # PyTorch's rule: the last window must start inside the image or its padding
        after.append((out - 1) * s + k - size - p)
    return {"kernel": kernel, "stride": stride, "before": padding, "after": tuple(after)}


def _global_window(source: Any) -> dict[str, Any]:
    shape = _shape(source)
    if shape is None:
        return {}
    size = tuple(shape[2:])
    return {"kernel": size, "stride": size, "before": (0, 0), "after": (0, 0)}


def _flattens_pooled_map(source: Any, start_dim: int, end_dim: int) -> bool:
    # flatten(x, 1) on an (n, c, 1, 1) map keeps the bytes in order: the plan's value serves.
    shape = _shape(source)
    pooled = shape is None or (len(shape) == 4 and shape[2:] == (1, 1))
    return start_dim == 1 and end_dim in (-1, 3) and pooled


def _full_size_first(node: torch.fx.Node, addends: list[Any]) -> list[Any]:
    """The addends with the one of the sum's shape first: oneDNN broadcasts only the second."""
    shapes = [_shape(addend) for addend in addends]
    if _shape(node) is None or shapes[0] == _shape(node):
        return addends
    if shapes[1] == _shape(node):
        return addends[::-1]
    raise ConfigError(f"a oneDNN plan broadcasts one addend only ({node.name}: {shapes})")


def _unsupported(node: torch.fx.Node, what: str | None = None) -> ConfigError:
    name = what or getattr(node.target, "__name__", str(node.target))
    return ConfigError(
        f"a oneDNN plan cannot run {name} ({node.op} {node.name}); "
        "use compile='onednn_graph' for this model"
    )


def check_plan_supported(model: nn.Module) -> None:
    """Raise :class:`ConfigError` naming the first layer a plan cannot run (no input needed)."""
    _Graph(model, None)


class OneDnnPlan:
    """A built plan for one input shape and layout: call it with such a tensor."""

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        _check_input(example, "runs")
        if any(module.training for module in model.modules()):
            # It computes the eval-mode function, and tracing shapes would update BN statistics.
            raise ConfigError("a oneDNN plan runs a model in eval mode: call model.eval() first")
        self._lib = load_onednn_plan_library()
        self._handle = self._lib.plan_new()
        if not self._handle:
            raise ConfigError("oneDNN could not start on this CPU")
        self._lock = threading.Lock()  # one set of buffers: one call at a time
        self.input_shape = tuple(example.shape)
        channels_last = _is_channels_last(example)
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        graph = _Graph(model, example)
        ops = graph.fuse()
        assert graph.output_shape is not None  # ShapeProp ran
        self.output_shape = graph.output_shape
        # Weights and biases as float32 arrays, alive until the C call that copies them.
        self._arrays: list[Tensor] = []
        self._call("plan_input", 0, *self.input_shape, int(channels_last))
        self._output_dims = self._build(ops, graph.output)
        self._check_against(model, example)

    def _check_against(self, model: nn.Module, example: Tensor) -> None:
        """Refuse a plan that computes another function than ``model`` on ``example``.

        The fx graph is what the plan is built from, and fx does not see everything eager
        PyTorch does (``x += y`` on a tensor read again under another name, say): one forward
        of the model itself is the proof, as every other path in ``resunit.deploy`` gives."""
        with torch.no_grad():
            expected = model(example.clone())
        if expected.numel() == 0:
            return
        difference = relative_difference(self(example), expected)
        if difference > PLAN_TOLERANCE:
            raise ConfigError(
                f"the oneDNN plan computes another function than the model (relative difference "
                f"{difference:.1e} on the first input); use compile='onednn_graph'"
            )

    def _build(self, ops: list[_Op], output: int) -> tuple[int, ...]:
        last_reader: dict[int, int] = {}
        for index, op in enumerate(ops):
            for value in [*op.inputs, op.output]:
                last_reader[value] = index
        last_reader[output] = len(ops)
        for index, op in enumerate(ops):
            self._add(op)
            self._arrays.clear()
            for value in {*op.inputs, op.output}:
                if last_reader[value] == index and value != 0:
                    self._call("plan_release", value)
        dims = (ctypes.c_int64 * 8)()
        rank = ctypes.c_int()
        self._call("plan_finish", output, dims, ctypes.byref(rank))
        return tuple(dims[: rank.value])

    def _add(self, op: _Op) -> None:
        source = op.inputs[0]
        module = op.module
        if op.kind == "conv":
            assert isinstance(module, nn.Conv2d)
            self._call(
                "plan_convolution",
                source,
                op.output,
                self._pointer(module.weight),
                self._pointer(module.bias),
                module.out_channels,
                module.in_channels,
                module.groups,
                _int64s(module.kernel_size),
                _int64s(module.stride),
                _int64s(module.padding),
                _int64s(module.dilation),
                int(op.accumulate_into is not None),
                int(op.relu),
            )
        elif op.kind == "batch_norm":
            assert isinstance(module, nn.BatchNorm2d)
            channels = module.num_features
            ones, zeros = torch.ones(channels), torch.zeros(channels)
            scale = module.weight if module.weight is not None else ones
            shift = module.bias if module.bias is not None else zeros
            self._call(
                "plan_batch_norm",
                source,
                op.output,
                self._pointer(scale),
                self._pointer(shift),
                self._pointer(module.running_mean),
                self._pointer(module.running_var),
                ctypes.c_float(module.eps),
                int(op.relu),
            )
        elif op.kind == "relu":
            self._call("plan_relu", source, op.output)
        elif op.kind == "add":
            self._call("plan_add", source, op.inputs[1], op.output, int(op.relu))
        elif op.kind in ("max_pool", "avg_pool"):
            window = [_int64s(op.extra[key]) for key in ("kernel", "stride", "before", "after")]
            self._call("plan_pool", source, op.output, int(op.kind == "max_pool"), *window)
        elif op.kind == "linear":
            assert isinstance(module, nn.Linear)
            self._call(
                "plan_linear",
                source,
                op.output,
                self._pointer(module.weight),
                self._pointer(module.bias),
                module.out_features,
                module.in_features,
                int(op.relu),
            )
        else:  # pragma: no cover - _Graph emits only the kinds above
            raise AssertionError(op.kind)

    def _call(self, name: str, *args: Any) -> None:
        if getattr(self._lib, name)(self._handle, *args) != 0:
            message = self._lib.plan_error(self._handle).decode(errors="replace")
            raise ConfigError(f"oneDNN plan: {message}")

    def _pointer(self, tensor: Tensor | None) -> int | None:
        if tensor is None:
            return None
        array = tensor.detach().to(torch.float32).contiguous()
        self._arrays.append(array)
        return array.data_ptr()

    def __call__(self, x: Tensor) -> Tensor:
        _check_input(x, "was built for")
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"this plan was built for inputs of shape {self.input_shape}")
        x = x.contiguous(memory_format=self._memory_format)
        out = torch.empty(self._output_dims, dtype=torch.float32)  # not the default dtype
        with self._lock:
            # ctypes lets go of the GIL for the call: other Python threads run meanwhile.
            self._call("plan_run", x.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out.view(self.output_shape)

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.plan_free(handle)
            self._handle = None


def _check_input(x: Tensor, verb: str) -> None:
    # The C side reads float32 from host memory: anything else would be read as garbage.
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
        raise ValueError(
            f"a oneDNN plan {verb} 4-d float32 CPU tensors, not {x.dim()}-d {x.dtype} on {x.device}"
        )


def _int64s(value: Any) -> Any:
    return (ctypes.c_int64 * 2)(*_pair(value))


def _is_channels_last(x: Tensor) -> bool:
    # A 1×1 image or one channel is both layouts at once: PyTorch's plain order wins.
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def onednn_plan_works() -> tuple[bool, str]:
    """Whether oneDNN plans build and compute correctly here, and why not."""
    try:
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
        x = torch.randn(1, 3, 8, 8)
        plan = OneDnnPlan(net, x)
        with torch.no_grad():
            difference = (plan(x) - net(x)).abs().max().item()
        if difference > 1e-5:
            return False, "its output differs from the model's"
    except Exception as exc:  # whatever stops it here, bench skips the variant and says why
        return False, f"{type(exc).__name__}: {first_line(exc)}"[:200]
    return True, ""


__all__ = ["OneDnnPlan", "check_plan_supported", "onednn_plan_works"]
