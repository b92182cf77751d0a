"""The residual units and their shortcuts: ``out = act(residual(x) + shortcut(x))``.

Read this file first. A residual unit adds a learned *residual* ``F(x)`` to its input
carried unchanged by a *shortcut*, so its layers only have to learn the change ``y − x``
(He et al. 2015, arXiv:1512.03385). When the unit changes the channel count or the
resolution, the shortcut must change them too:

* ``identity``   — shapes match: ``x`` itself, no parameters;
* ``projection`` — 1×1 conv with the unit's stride + BN (the paper's option B/C);
* ``pad``        — option A: subsample by the stride and append zero channels, no parameters;
* ``avgpool``    — ResNet-D (arXiv:1812.01187): average-pool by the stride, then 1×1 conv + BN;
* ``none``       — a *plain* unit with no shortcut at all (the paper's plain baselines).

Module names follow torchvision (``conv1``, ``bn1``, ``downsample.0`` …) so that
checkpoints are interchangeable; ``residual(x)`` and ``shortcut(x)`` are methods over those
modules, so analysis can evaluate each branch alone and a lesion can drop the residual.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from resunit.errors import ConfigError
from resunit.validation import did_you_mean, require_fraction, require_int

SHORTCUT_KINDS = ("auto", "identity", "projection", "pad", "avgpool", "none")
# The paper's letters for the same choices (He et al. 2015, §4.1 "Identity vs. Projection
# Shortcuts"): A pads, B projects only where shapes change, C projects everywhere.
_PAPER_OPTIONS = {"a": "pad", "b": "auto", "c": "projection"}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution with padding 1 and no bias (a BatchNorm follows it)."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution with no bias (a BatchNorm follows it)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def normalize_shortcut_kind(kind: str) -> str:
    """Return the canonical shortcut kind for ``kind`` (also accepts the paper's A/B/C)."""
    canonical = _PAPER_OPTIONS.get(kind.lower(), kind.lower()) if isinstance(kind, str) else None
    if canonical not in SHORTCUT_KINDS:
        raise ConfigError(
            f"unknown shortcut kind {kind!r}{did_you_mean(kind, SHORTCUT_KINDS)}: choose one "
            f"of {', '.join(SHORTCUT_KINDS)} (or the paper's options A, B, C)"
        )
    return canonical


def resolve_shortcut(in_channels: int, out_channels: int, stride: int, kind: str = "auto") -> str:
    """Decide which shortcut a unit uses: the single place where that choice is made.

    Returns one of ``identity``, ``projection``, ``pad``, ``avgpool``, ``none``. ``auto``,
    ``pad`` and ``avgpool`` use the identity whenever shapes already match; only an explicit
    ``projection`` projects a shortcut whose shapes match (the paper's option C). Asking for
    ``identity`` where the unit changes shape is an error.
    """
    kind = normalize_shortcut_kind(kind)
    shapes_match = in_channels == out_channels and stride == 1
    if kind == "none":
        return "none"
    if kind == "projection":
        return "projection"
    if shapes_match:
        return "identity"
    if kind == "identity":
        raise ConfigError(
            f"an identity shortcut cannot go from {in_channels} to {out_channels} channels at "
            f"stride {stride}: use shortcut='auto' (identity where shapes match, projection "
            "elsewhere) or 'pad'"
        )
    if kind == "pad" and out_channels < in_channels:
        raise ConfigError(
            f"shortcut 'pad' (option A) cannot go from {in_channels} to {out_channels} channels: "
            "it only appends zero channels; use shortcut='projection' or 'auto' instead"
        )
    return "projection" if kind == "auto" else kind


class PadShortcut(nn.Module):
    """Option A: keep every ``stride``-th pixel and append zero channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # Taking every stride-th pixel gives ceil(H/stride) rows, the same as the 3×3/stride
        # convolution of the residual branch, for even and odd sizes alike.
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, *, with_norm: bool = True
) -> nn.Module | None:
    """Build the module for a resolved shortcut ``kind``; ``None`` for identity or none.

    ``with_norm=False`` drops the BatchNorm after the projection, as pre-activation units do
    (their sum is normalised by the next unit's first BN; He et al. 2016).
    """
    if kind in ("identity", "none"):
        return None
    if kind == "pad":
        return PadShortcut(in_channels, out_channels, stride)
    layers: list[nn.Module] = []
    if kind == "avgpool":
        if stride > 1:
            # ceil_mode keeps ceil(H/stride) rows, matching the residual branch on odd sizes.
            layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        else:
            layers.append(nn.Identity())
        layers.append(conv1x1(in_channels, out_channels))
    else:
        layers.append(conv1x1(in_channels, out_channels, stride))
    if with_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): zero the whole residual of random samples."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # One draw per sample, broadcast over the rest (a list, not a tuple product: TorchScript).
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (no parameters, so checkpoints are unaffected)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = require_fraction("drop_path", drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ResidualUnit(nn.Module):
    """What every unit shares: the shortcut, stochastic depth, and the two-branch forward.

    Subclasses build their layers (with the torchvision names, ``relu`` included) and
    implement :meth:`residual`; :meth:`forward` adds the two branches.
    """

    expansion: ClassVar[int] = 1
    preactivation: ClassVar[bool] = False

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, shortcut: str, drop_path: float
    ) -> None:
        super().__init__()
        in_channels = require_int("in_channels", in_channels, 1)
        out_channels = require_int("out_channels", out_channels, 1)
        stride = require_int("stride", stride, 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.shortcut_kind = resolve_shortcut(in_channels, out_channels, stride, shortcut)
        self.drop_path = DropPath(drop_path)
        if self.drop_path.drop_prob > 0 and self.shortcut_kind == "none":
            # Dropping a plain unit's residual drops its whole output: the sample's features
            # are zero from there on, not a shallower network.
            raise ConfigError(
                "stochastic depth (drop_path) drops a unit's residual and keeps its shortcut; "
                "a plain unit (shortcut='none') has no shortcut to keep"
            )

    def extra_repr(self) -> str:
        # What the printed layers do not show: dropout, and where a pre-activation unit's
        # input BN–ReLU goes when it is not the default.
        notes = []
        if getattr(self, "dropout", 0.0):
            notes.append(f"dropout={self.dropout}")
        if getattr(self, "input_activation", "residual") != "residual":
            notes.append(f"input_activation={self.input_activation!r}")
        return ", ".join(notes)

    def _attach_shortcut(self) -> None:
        """Create ``downsample``; subclasses call this last so that the state_dict lists the
        shortcut after the residual layers, in torchvision's order."""
        # Pre-activation projections carry no BN: the next unit normalises the sum.
        self.downsample = make_shortcut(
            self.shortcut_kind,
            self.in_channels,
            self.out_channels,
            self.stride,
            with_norm=not self.preactivation,
        )

    @property
    def has_shortcut(self) -> bool:
        """False for a plain unit (``shortcut='none'``)."""
        return self.shortcut_kind != "none"

    def residual(self, x: Tensor) -> Tensor:
        """The residual branch F(x), without the shortcut and without the final activation."""
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor | None:
        """The shortcut branch: ``x`` itself, or its projection/padding; ``None`` if plain."""
        if not self.has_shortcut:
            return None
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        """``y = relu(F(x) + shortcut(x))`` (He et al. 2015); a plain unit drops the sum.

        Pre-activation units (:class:`PreActUnit`) override this: no ReLU after the sum.
        """
        identity = self.shortcut(x)
        out = self.drop_path(self.residual(x))  # stochastic depth drops F(x), never the skip
        if identity is not None:
            # In place, as torchvision does: F(x) is a fresh tensor that nothing else holds
            # (BN's backward keeps its input, not its output), so no copy is needed.
            out += identity
        return self.relu(out)

    def zero_init_residual(self) -> None:
        """Zero the residual's last scale so a fresh unit starts as its shortcut.

        Goyal et al. 2017 (arXiv:1706.02677): "improves the model by 0.2~0.3%".
        """
        raise NotImplementedError


class BasicBlock(ResidualUnit):
    """Two 3×3 conv+BN layers with a ReLU between: ``relu(F(x) + shortcut(x))``.

    The stride sits on the first convolution; the shortcut matches it. ``dropout`` drops
    activations between the two convolutions while training (as Wide ResNets do).
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "auto",
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        planes = require_int("planes", planes, 1)
        if groups != 1 or base_width != 64:
            raise ConfigError("BasicBlock supports only groups=1 and base_width=64")
        super().__init__(in_channels, planes * self.expansion, stride, shortcut, drop_path)
        self.dropout = require_fraction("dropout", dropout)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self._attach_shortcut()

    def residual(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = _dropout_between_convs(out, self.dropout, self.training)
        out = self.conv2(out)
        out = self.bn2(out)
        return out

    def zero_init_residual(self) -> None:
        nn.init.zeros_(self.bn2.weight)


def _dropout_between_convs(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout after the middle ReLU, before the second 3×3 convolution (Zagoruyko &
    Komodakis 2016, §2.3). Only in training: an inference trace holds no dropout node."""
    if p > 0.0 and training:
        return F.dropout(x, p, True)
    return x


def _bottleneck_width(planes: int, groups: int, base_width: int) -> int:
    """Channels of a bottleneck's 3×3: ``int(planes · base_width / 64) · groups`` (torchvision)."""
    planes = require_int("planes", planes, 1)
    groups = require_int("groups", groups, 1)
    base_width = require_int("base_width", base_width, 1)
    width = int(planes * (base_width / 64.0)) * groups
    if width < 1:
        # The int() rounds a narrow group down to nothing: the convolutions would be empty.
        raise ConfigError(
            f"a bottleneck with planes={planes}, base_width={base_width} and groups={groups} "
            f"has int({planes}·{base_width}/64)·{groups} = 0 channels in its 3×3: raise "
            "base_width (a ResNet's width_per_group; 64 is a plain ResNet) or planes"
        )
    return width


class Bottleneck(ResidualUnit):
    """1×1 reduce → 3×3 → 1×1 expand (×4), each with BN: ``relu(F(x) + shortcut(x))``.

    The stride sits on the 3×3 (ResNet "v1.5", as torchvision: about +0.5% top-1 over
    striding the first 1×1). ``groups`` and ``base_width`` widen the 3×3 for ResNeXt and
    Wide ResNet-50/101.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "auto",
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        width = _bottleneck_width(planes, groups, base_width)
        super().__init__(in_channels, planes * self.expansion, stride, shortcut, drop_path)
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, self.out_channels)
        self.bn3 = nn.BatchNorm2d(self.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self._attach_shortcut()

    def residual(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        return out

    def zero_init_residual(self) -> None:
        nn.init.zeros_(self.bn3.weight)


# Where a pre-activation unit's input BN–ReLU goes (``input_activation``), in the words of
# fb.resnet.torch's preresnet.lua, the code of He et al. 2016: "residual" (its default, inside
# the residual branch), "shared" (``both_preact``: before the split, so both branches read it)
# and "none" (``no_preact``: the stem has just applied one).
INPUT_ACTIVATIONS = ("residual", "shared", "none")


class PreActUnit(ResidualUnit):
    """Pre-activation ordering (He et al. 2016, arXiv:1603.05027): BN–ReLU–conv, no ReLU
    after the sum, so the shortcut path stays a pure identity from unit to unit.

    A projection shortcut reads the *pre-activated* input, as in the paper's code. The
    network's first unit differs (the paper, §4: "we adopt the first activation right after
    conv1 and before splitting into two paths"): after a bare convolution its BN–ReLU feeds
    both branches (``input_activation="shared"``); after the ImageNet stem, which ends in
    BN–ReLU and a max-pool already, it has none (``"none"``). :class:`~resunit.models.ResNet`
    sets both.
    """

    preactivation = True
    # The default for subclasses written before the option existed (they set bn1 themselves).
    input_activation = "residual"

    def _init_input_activation(self, input_activation: str) -> None:
        if input_activation not in INPUT_ACTIVATIONS:
            raise ConfigError(
                f"unknown input_activation {input_activation!r}: choose one of "
                + ", ".join(INPUT_ACTIVATIONS)
            )
        self.input_activation = input_activation
        # None, not a module: a unit behind the ImageNet stem has no input BN to hold weights.
        self.bn1 = nn.BatchNorm2d(self.in_channels) if input_activation != "none" else None

    def preactivate(self, x: Tensor) -> Tensor:
        """BN + ReLU of the unit's input (``x`` itself when ``input_activation="none"``)."""
        if self.bn1 is None:
            return x
        return F.relu(self.bn1(x))

    def residual_from_preactivated(self, out: Tensor) -> Tensor:
        """The residual branch after the input BN–ReLU: what each unit type defines."""
        raise NotImplementedError

    def residual(self, x: Tensor) -> Tensor:
        return self.residual_from_preactivated(self.preactivate(x))

    def _shortcut_of(self, x: Tensor, preactivated: Tensor) -> Tensor:
        if self.downsample is not None:
            return self.downsample(preactivated)
        return preactivated if self.input_activation == "shared" else x

    def shortcut(self, x: Tensor) -> Tensor | None:
        if not self.has_shortcut:
            return None
        return self._shortcut_of(x, self.preactivate(x))

    def forward(self, x: Tensor) -> Tensor:
        preactivated = self.preactivate(x)
        out = self.residual_from_preactivated(preactivated)
        out = self.drop_path(out)
        if self.has_shortcut:
            out = out + self._shortcut_of(x, preactivated)
        return out


class PreActBasicBlock(PreActUnit):
    """Pre-activation basic unit: ``x + conv(relu(bn(conv(relu(bn(x))))))``, the unit of
    Wide ResNets; ``dropout`` drops activations before the second convolution in training."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "auto",
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        input_activation: str = "residual",
    ) -> None:
        planes = require_int("planes", planes, 1)
        if groups != 1 or base_width != 64:
            raise ConfigError("PreActBasicBlock supports only groups=1 and base_width=64")
        super().__init__(in_channels, planes * self.expansion, stride, shortcut, drop_path)
        self.dropout = require_fraction("dropout", dropout)
        self._init_input_activation(input_activation)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self._attach_shortcut()

    def residual_from_preactivated(self, out: Tensor) -> Tensor:
        out = self.conv1(out)
        out = self.bn2(out)
        out = F.relu(out)
        out = _dropout_between_convs(out, self.dropout, self.training)
        out = self.conv2(out)
        return out

    def zero_init_residual(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(PreActUnit):
    """Pre-activation bottleneck: BN–ReLU–1×1, BN–ReLU–3×3 (stride), BN–ReLU–1×1 (×4)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "auto",
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
        input_activation: str = "residual",
    ) -> None:
        width = _bottleneck_width(planes, groups, base_width)
        super().__init__(in_channels, planes * self.expansion, stride, shortcut, drop_path)
        self._init_input_activation(input_activation)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, self.out_channels)
        self._attach_shortcut()

    def residual_from_preactivated(self, out: Tensor) -> Tensor:
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        out = self.conv2(out)
        out = F.relu(self.bn3(out))
        out = self.conv3(out)
        return out

    def zero_init_residual(self) -> None:
        nn.init.zeros_(self.conv3.weight)


BLOCKS: dict[str, type[ResidualUnit]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}


def describe_shortcut(unit: ResidualUnit, in_size: int | None = None) -> str:
    """One human sentence saying which shortcut ``unit`` uses and why."""
    cin, cout, s = unit.in_channels, unit.out_channels, unit.stride
    change = []
    if cin != cout:
        change.append(f"{cin}→{cout} channels")
    if s != 1:
        change.append(
            f"{in_size}→{-(-in_size // s)} pixels" if in_size is not None else f"stride {s}"
        )
    why = ", ".join(change)
    kind = unit.shortcut_kind
    if kind == "identity":
        return "identity: shapes match"
    if kind == "none":
        return "none: plain unit"
    if kind == "pad":
        return f"option A pad: {why}"
    if kind == "avgpool":
        return f"avg-pool/{s} + projection 1×1: {why}"
    if not why:
        return "projection 1×1: requested although shapes match"
    return f"projection 1×1/{s}: {why}"


__all__ = [
    "BLOCKS",
    "INPUT_ACTIVATIONS",
    "SHORTCUT_KINDS",
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActUnit",
    "ResidualUnit",
    "conv1x1",
    "conv3x3",
    "describe_shortcut",
    "drop_path",
    "make_shortcut",
    "normalize_shortcut_kind",
    "resolve_shortcut",
]
