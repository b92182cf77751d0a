"""ResNet assembly (stem → stages of residual units → pooled classifier) and the model registry.

One ``ResNet`` class builds every family; the registry table at the bottom, not code, says
what differs between ``resnet50`` and ``resnet56``. ImageNet models match torchvision's
parameter counts and state_dict keys exactly, so its checkpoints load unchanged.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from resunit.blocks import (
    BLOCKS,
    ResidualUnit,
    normalize_shortcut_kind,
)
from resunit.errors import ConfigError
from resunit.validation import did_you_mean, require_fraction, require_int

# How many stages a scripted model can run: TorchScript cannot look a stage up by a computed
# name, so its forward names layer1 … layer8 one by one (see ResNet._forward_stages_scripted).
MAX_SCRIPTABLE_STAGES = 8
# Stage widths ("planes") of the ImageNet ResNets (He et al. 2015, Table 1).
IMAGENET_WIDTHS = (64, 128, 256, 512)


def resolve_block(block: object) -> type[ResidualUnit]:
    """The unit class for a ``block`` name or class; a ConfigError naming the choices otherwise."""
    if isinstance(block, type) and issubclass(block, ResidualUnit):
        return block
    if isinstance(block, str) and block in BLOCKS:
        return BLOCKS[block]
    raise ConfigError(
        f"unknown block {block!r}{did_you_mean(block, BLOCKS)}: choose one of "
        f"{', '.join(BLOCKS)} (or pass a ResidualUnit subclass)"
    )


def _int_sequence(name: str, values: object, minimum: int) -> tuple[int, ...]:
    """``values`` as a non-empty tuple of integers ≥ ``minimum``; a ConfigError otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name} must be a non-empty list of integers, got {values!r}")
    try:
        return tuple(require_int(name, v, minimum) for v in values)
    except ConfigError:  # name the whole list, not the one entry
        raise ConfigError(
            f"every entry of {name} must be an integer ≥ {minimum}, got {list(values)!r}"
        ) from None


class ResNet(nn.Module):
    """A residual network: stem, stages of residual units, global average pool, linear head.

    Args:
        block: unit type: ``"basic"``, ``"bottleneck"``, ``"preact_basic"``,
            ``"preact_bottleneck"`` (or the class itself).
        layers: number of units in each stage (at least one each: a stage's first unit is
            what changes the resolution and width).
        widths: "planes" of each stage; a stage outputs ``width × block.expansion`` channels.
        stem: ``"imagenet"`` (7×7/2 conv, BN, ReLU, 3×3/2 max-pool) or ``"cifar"`` (one 3×3/1
            conv, followed by BN and ReLU unless the units are pre-activation ones).
        stem_width: channels out of the stem (default: 64 for imagenet, ``widths[0]`` for cifar).
        num_classes: size of the classifier (0 for no classifier: features only).
        in_chans: input channels (1 for grayscale).
        shortcut: shortcut kind for every unit (see :mod:`resunit.blocks`).
        groups, width_per_group: ResNeXt cardinality and bottleneck width (64 = plain ResNet).
        zero_init_residual: start each unit's residual at zero (Goyal et al. 2017).
        drop_path_rate: stochastic depth of the last unit, in [0, 1); earlier units get
            linearly less.
        dropout: dropout between the two 3×3 convolutions of every basic unit while
            training, in [0, 1) (Wide ResNets use 0.3; bottleneck units have no such place).

    A pre-activation network's first unit takes the stem's activation the way He et al. 2016
    do: after the bare CIFAR convolution its BN–ReLU feeds both branches, after the ImageNet
    stem (which ends in BN–ReLU and a max-pool) it has none of its own.

    Every argument is checked before anything is built: a bad value is a ConfigError.
    """

    def __init__(
        self,
        block: str | type[ResidualUnit],
        layers: Sequence[int],
        widths: Sequence[int] = IMAGENET_WIDTHS,
        *,
        stem: str = "imagenet",
        stem_width: int | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        shortcut: str = "auto",
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        block_cls = resolve_block(block)
        layers = _int_sequence("layers", layers, 1)
        widths = _int_sequence("widths", widths, 1)
        if len(layers) != len(widths):
            raise ConfigError(
                f"need one width per stage: layers={list(layers)}, widths={list(widths)}"
            )
        if not isinstance(stem, str) or stem not in ("imagenet", "cifar"):
            raise ConfigError(f"unknown stem {stem!r}: choose 'imagenet' or 'cifar'")
        if stem_width is not None:  # `is None`, not `or`: stem_width=0 is an error, not a default
            stem_width = require_int("stem_width", stem_width, 1)
        num_classes = require_int("num_classes", num_classes, 0)
        in_chans = require_int("in_chans", in_chans, 1)
        groups = require_int("groups", groups, 1)
        width_per_group = require_int("width_per_group", width_per_group, 1)
        # numpy's bool and 0/1 (hand-written overrides) mean what they say; 2 or "yes" do not.
        if not isinstance(zero_init_residual, (bool, np.bool_)) and zero_init_residual not in (
            0,
            1,
        ):
            raise ConfigError(
                f"zero_init_residual must be True or False, got {zero_init_residual!r}"
            )
        zero_init_residual = bool(zero_init_residual)
        # Checked here, not per unit, so the message names this argument and its own value.
        drop_path_rate = require_fraction("drop_path_rate", drop_path_rate)
        dropout = require_fraction("dropout", dropout)
        # What the unit class takes beyond the common arguments: dropout (basic units) and
        # input_activation (pre-activation units; a custom one without it keeps its own).
        unit_options = inspect.signature(block_cls).parameters
        if dropout and "dropout" not in unit_options:
            raise ConfigError(
                f"dropout sits between the two 3×3 convolutions of a basic unit (Wide ResNets); "
                f"{block_cls.__name__} units have no such place"
            )
        plain = normalize_shortcut_kind(shortcut) == "none"
        if plain and (zero_init_residual or drop_path_rate):
            # Both zero a unit's residual, and a plain unit is nothing else: its output, and
            # every gradient before it, would be zero.
            option = "zero_init_residual" if zero_init_residual else "drop_path_rate"
            raise ConfigError(
                f"{option} zeroes residual branches, and a plain network (shortcut='none') has "
                "no shortcut to carry the signal past them"
            )
        self.block = block_cls
        self.stem_type = stem
        self.shortcut_kind = normalize_shortcut_kind(shortcut)
        self.preactivation = block_cls.preactivation
        self.in_chans = in_chans

        if stem_width is None:
            stem_width = 64 if stem == "imagenet" else widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        # A pre-activation network normalises in the first unit instead (He et al. 2016), but
        # not before a max-pool: the ImageNet stem pools BN-ReLU outputs in either ordering, as
        # He et al. 2016 and fb.resnet.torch's preresnet.lua do (conv-BN-ReLU-maxpool).
        if not self.preactivation or stem == "imagenet":
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        total_units = sum(layers)
        unit_index = 0
        channels = stem_width
        stage_names = []
        for stage, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            units = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                rate = drop_path_rate * unit_index / max(total_units - 1, 1)
                options: dict[str, Any] = {"dropout": dropout} if dropout else {}
                if self.preactivation and unit_index == 0 and "input_activation" in unit_options:
                    options["input_activation"] = "none" if stem == "imagenet" else "shared"
                unit = block_cls(
                    channels,
                    planes,
                    stride,
                    shortcut=self.shortcut_kind,
                    groups=groups,
                    base_width=width_per_group,
                    drop_path=rate,
                    **options,
                )
                units.append(unit)
                channels = unit.out_channels
                unit_index += 1
            name = f"layer{stage + 1}"
            self.add_module(name, nn.Sequential(*units))
            stage_names.append(name)
        self.stage_names = stage_names
        self.num_features = channels

        if self.preactivation:
            self.final_bn = nn.BatchNorm2d(channels)
            self.final_relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He initialisation (fan-out, as torchvision); BN starts as the identity transform.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for unit in self.units():
                unit.zero_init_residual()

    # --- structure -------------------------------------------------------------------------

    @property
    @torch.jit.unused  # looks stages up by a computed name, which TorchScript cannot compile
    def stages(self) -> list[nn.Sequential]:
        """The stages in order (``layer1``, ``layer2``, …)."""
        return [getattr(self, name) for name in self.stage_names]

    def named_units(self) -> Iterator[tuple[str, ResidualUnit]]:
        """Every residual unit with its state_dict prefix, e.g. ``("layer2.0", unit)``."""
        for name in self.stage_names:
            for i, unit in enumerate(getattr(self, name)):
                yield f"{name}.{i}", unit

    def units(self) -> list[ResidualUnit]:
        """Every residual unit in forward order."""
        return [unit for _, unit in self.named_units()]

    # --- forward ---------------------------------------------------------------------------

    # The optional layers are tested with hasattr, not with flags: TorchScript resolves hasattr
    # on a module while compiling and skips the branch for a layer this model does not have.

    def forward_stem(self, x: Tensor) -> Tensor:
        """The stem alone: what the first unit receives."""
        x = self.conv1(x)
        if hasattr(self, "bn1"):
            x = self.relu(self.bn1(x))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        return x

    def _finish_features(self, x: Tensor) -> Tensor:
        if hasattr(self, "final_bn"):
            x = self.final_relu(self.final_bn(x))
        return x

    @torch.jit.unused
    def _forward_stages(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def _forward_stages_scripted(self, x: Tensor) -> Tensor:
        # Unrolled by the compiler to exactly this model's stages (layer1 always exists);
        # __prepare_scriptable__ refuses models with more stages than are named here.
        x = self.layer1(x)
        if hasattr(self, "layer2"):
            x = self.layer2(x)
        if hasattr(self, "layer3"):
            x = self.layer3(x)
        if hasattr(self, "layer4"):
            x = self.layer4(x)
        if hasattr(self, "layer5"):
            x = self.layer5(x)
        if hasattr(self, "layer6"):
            x = self.layer6(x)
        if hasattr(self, "layer7"):
            x = self.layer7(x)
        if hasattr(self, "layer8"):
            x = self.layer8(x)
        return x

    def __prepare_scriptable__(self) -> ResNet:
        # torch.jit.script calls this first: a deeper model would silently lose its last stages.
        if len(self.stage_names) > MAX_SCRIPTABLE_STAGES:
            raise ConfigError(
                f"TorchScript can run at most {MAX_SCRIPTABLE_STAGES} stages and this model has "
                f"{len(self.stage_names)}: use torch.jit.trace or torch.export instead"
            )
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch → last feature map (before pooling)."""
        x = self.forward_stem(x)
        if torch.jit.is_scripting():
            x = self._forward_stages_scripted(x)
        else:
            x = self._forward_stages(x)
        return self._finish_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map → logits (or the pooled features with ``pre_logits=True``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def features(self, x: Tensor) -> list[Tensor]:
        """The output map of every stage, highest resolution first."""
        maps = []
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        maps[-1] = self._finish_features(maps[-1])
        return maps

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes (0: no
        head, the pooled features come out). It gets the dtype and device of the model's
        parameters, so a model already moved or cast keeps working."""
        num_classes = require_int("num_classes", num_classes, 0)
        like = self.conv1.weight
        self.num_classes = num_classes
        self.fc = (
            nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
            if num_classes
            else nn.Identity()
        )


# --- registry ----------------------------------------------------------------------------


class _ReadOnlyDict(Mapping[str, Any]):
    """A mapping nobody can edit that still copies and pickles like a dict (a
    ``MappingProxyType`` does neither, which broke ``copy.deepcopy`` of a spec)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ReadOnlyDict, (self._items,))


def _frozen(value: Any) -> Any:
    """``value`` with every list made a tuple and every mapping read-only, recursively."""
    if isinstance(value, Mapping):
        return _ReadOnlyDict({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: the ``ResNet`` arguments plus what a table shows about it.

    ``kwargs`` is read-only (lists become tuples): a caller editing the spec it was handed
    must not change what every later ``create_model`` builds.
    """

    name: str
    family: str
    description: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))


_REGISTRY: dict[str, ModelSpec] = {}
CIFAR_WIDTHS = (16, 32, 64)


def _register(name: str, family: str, description: str, **kwargs: Any) -> None:
    _REGISTRY[name] = ModelSpec(name, family, description, kwargs)


_IMAGENET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
                    152: [3, 8, 36, 3]}  # fmt: skip
for _depth, _layers in _IMAGENET_LAYERS.items():
    _register(
        f"resnet{_depth}",
        "imagenet",
        f"ResNet-{_depth} (He et al. 2015), torchvision-compatible",
        block="basic" if _depth < 50 else "bottleneck",
        layers=_layers,
    )
for _depth, _wpg in [(50, 128), (101, 128)]:
    _register(
        f"wide_resnet{_depth}_2",
        "imagenet",
        f"Wide ResNet-{_depth}-2: bottleneck 3×3 twice as wide, torchvision-compatible",
        block="bottleneck",
        layers=_IMAGENET_LAYERS[_depth],
        width_per_group=_wpg,
    )
for _depth, _groups, _wpg in [(50, 32, 4), (101, 32, 8)]:
    _register(
        f"resnext{_depth}_{_groups}x{_wpg}d",
        "imagenet",
        f"ResNeXt-{_depth} {_groups}×{_wpg}d (Xie et al. 2017), torchvision-compatible",
        block="bottleneck",
        layers=_IMAGENET_LAYERS[_depth],
        groups=_groups,
        width_per_group=_wpg,
    )

# CIFAR networks of He et al. 2015 §4.2: 6n+2 layers, 16/32/64 channels, option-A shortcuts.
for _depth in (20, 32, 44, 56, 110, 1202):
    _n = (_depth - 2) // 6
    _register(
        f"resnet{_depth}",
        "cifar",
        f"CIFAR ResNet-{_depth}: 3 stages × {_n} basic units, option A shortcuts",
        block="basic",
        layers=[_n] * 3,
        widths=CIFAR_WIDTHS,
        stem="cifar",
        shortcut="pad",
        num_classes=10,
    )
for _depth in (20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    _register(
        f"plain{_depth}",
        "cifar-plain",
        f"Plain-{_depth}: ResNet-{_depth} without shortcuts (the degradation baseline)",
        block="basic",
        layers=[_n] * 3,
        widths=CIFAR_WIDTHS,
        stem="cifar",
        shortcut="none",
        num_classes=10,
    )
# Pre-activation networks of He et al. 2016 (arXiv:1603.05027), projection where shapes change.
_register(
    "preact_resnet110",
    "cifar-preact",
    "Pre-activation ResNet-110: 3 stages × 18 basic units",
    block="preact_basic",
    layers=[18] * 3,
    widths=CIFAR_WIDTHS,
    stem="cifar",
    num_classes=10,
)
for _depth in (164, 1001):
    _n = (_depth - 2) // 9
    _register(
        f"preact_resnet{_depth}",
        "cifar-preact",
        f"Pre-activation ResNet-{_depth}: 3 stages × {_n} bottleneck units",
        block="preact_bottleneck",
        layers=[_n] * 3,
        widths=CIFAR_WIDTHS,
        stem="cifar",
        num_classes=10,
    )
# Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k, pre-activation basic units, (d−4)/6 each.
for _depth, _k in [(16, 4), (16, 8), (28, 10), (40, 4)]:
    _n = (_depth - 4) // 6
    _register(
        f"wrn_{_depth}_{_k}",
        "cifar-wide",
        f"Wide ResNet-{_depth}-{_k}: 3 stages × {_n} pre-activation units, widths ×{_k}; "
        "the paper's dropout: dropout=0.3",
        block="preact_basic",
        layers=[_n] * 3,
        widths=tuple(w * _k for w in CIFAR_WIDTHS),
        stem="cifar",
        stem_width=16,
        num_classes=10,
    )


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models (optionally of one family), in registration order."""
    families = {spec.family for spec in _REGISTRY.values()}
    if family is not None and family not in families:
        raise ConfigError(f"unknown family {family!r}: choose one of {', '.join(sorted(families))}")
    return [name for name, spec in _REGISTRY.items() if family in (None, spec.family)]


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The RGB input a model of this name is made for: 32×32 for the CIFAR families, else 224."""
    size = 32 if get_model_spec(name).family.startswith("cifar") else 224
    return (3, size, size)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a clear error naming close matches otherwise."""
    if not isinstance(name, str):  # e.g. a model where its name belongs: not its whole repr
        raise ConfigError(f"a model name is a string, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model {name!r}{did_you_mean(name, _REGISTRY)}; "
            "`resunit models` lists the available ones"
        )
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    **overrides: Any,
) -> ResNet:
    """Build a registered model, e.g. ``create_model("resnet20", num_classes=10, in_chans=1)``.

    ``overrides`` replace any :class:`ResNet` argument (``shortcut="B"``,
    ``zero_init_residual=True``, ``drop_path_rate=0.1`` …). An unknown argument name or a bad
    value is a ConfigError; ``None`` for ``num_classes``/``in_chans`` keeps the registered value.
    """
    kwargs = dict(get_model_spec(name).kwargs)
    # Names are checked here, so that a TypeError from ResNet below is a bug, not a typo.
    options = list(inspect.signature(ResNet).parameters)
    unknown = [key for key in overrides if key not in options]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"cannot build {name!r}: it has no option {key!r}{did_you_mean(key, options)}; "
            f"the options are {', '.join(options)}"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    kwargs.update(overrides)
    return ResNet(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, frozen ones included (what papers and torchvision's tables
    report); ``trainable_only=True`` counts only those with ``requires_grad``. Buffers (BN
    running statistics) are never counted; a parameter shared by two modules counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dtype_and_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Where ``module`` computes: the dtype and device of its first floating-point parameter
    or buffer (CPU float32 if it has none, e.g. an ONNX Runtime model)."""
    device = None
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
        device = device or tensor.device  # e.g. BN's integer num_batches_tracked
    return torch.float32, device or torch.device("cpu")


def model_parameter_count(name: str, **overrides: Any) -> int:
    """Parameter count of a registered model, built on the meta device (no memory, instant)."""
    with torch.device("meta"):
        return count_parameters(create_model(name, **overrides))


__all__ = [
    "CIFAR_WIDTHS",
    "IMAGENET_WIDTHS",
    "MAX_SCRIPTABLE_STAGES",
    "ModelSpec",
    "ResNet",
    "count_parameters",
    "create_model",
    "default_input_shape",
    "dtype_and_device",
    "get_model_spec",
    "list_models",
    "model_parameter_count",
    "resolve_block",
]
