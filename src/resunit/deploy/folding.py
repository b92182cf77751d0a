"""BatchNorm folding: each BN that follows a conv becomes that conv's weight and bias.

The folded copy computes the same function as the eval-mode original (checked with
:func:`relative_difference`, the error relative to the output's scale) with one layer
fewer per conv.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from resunit.blocks import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    PreActUnit,
)
from resunit.errors import ConfigError
from resunit.models import ResNet

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
        if isinstance(module, PreActUnit) and module.bn1 is not None:
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
        if isinstance(module, ResNet) and getattr(module, "bn1", None) is not None:
            # Every stem BN follows conv1, the ImageNet stem of a pre-activation net's too.
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


__all__ = [
    "fold_batchnorm",
    "fold_conv_bn",
    "relative_difference",
]
