"""The residual units: shapes, shortcut choice, and the forward equation against float64 maths."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resunit.blocks import (
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    describe_shortcut,
    resolve_shortcut,
)
from resunit.errors import ConfigError


def n_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics and affine parameters, so eval mode is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def bn_ref(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm written out: (x − μ)/√(σ² + ε)·γ + β."""
    shape = (1, -1, 1, 1)
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


# --- the worked example of the guide ------------------------------------------------------


def test_worked_example_64_to_128_stride_2_uses_projection():
    block = BasicBlock(64, 128, stride=2)
    x = torch.randn(1, 64, 56, 56)
    assert block(x).shape == (1, 128, 28, 28)
    assert block.shortcut_kind == "projection"
    conv, bn = block.downsample
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert isinstance(bn, nn.BatchNorm2d)
    assert n_params(block.downsample) == 64 * 128 + 2 * 128


def test_identity_shortcut_when_shapes_match():
    block = BasicBlock(64, 64)
    x = torch.randn(2, 64, 14, 14)
    assert block.shortcut_kind == "identity"
    assert block.downsample is None
    assert block.shortcut(x) is x
    # Only the two 3×3 convolutions and their BNs: no shortcut parameters at all.
    assert n_params(block) == 2 * (64 * 64 * 9 + 2 * 64)


def test_projection_only_when_asked_for_if_shapes_match():
    block = BasicBlock(64, 64, shortcut="projection")
    assert block.shortcut_kind == "projection"
    assert n_params(block.downsample) == 64 * 64 + 2 * 64


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "kind", "expected"),
    [
        (64, 64, 1, "auto", "identity"),
        (64, 128, 1, "auto", "projection"),
        (64, 64, 2, "auto", "projection"),
        (64, 64, 1, "projection", "projection"),
        (16, 32, 2, "pad", "pad"),
        (16, 16, 1, "pad", "identity"),
        (64, 128, 2, "avgpool", "avgpool"),
        (64, 64, 1, "avgpool", "identity"),
        (64, 128, 2, "none", "none"),
        (16, 32, 2, "A", "pad"),
        (16, 32, 2, "B", "projection"),
        (16, 16, 1, "B", "identity"),
        (16, 16, 1, "C", "projection"),
        (64, 64, 1, "identity", "identity"),
    ],
)
def test_resolve_shortcut(cin, cout, stride, kind, expected):
    assert resolve_shortcut(cin, cout, stride, kind) == expected


@pytest.mark.parametrize(("cout", "stride"), [(128, 1), (64, 2), (128, 2)])
def test_an_identity_shortcut_where_the_shape_changes_is_refused(cout, stride):
    with pytest.raises(ConfigError, match=f"identity shortcut cannot go from 64 to {cout} "):
        BasicBlock(64, cout, stride=stride, shortcut="identity")
    assert BasicBlock(64, 64, shortcut="identity").shortcut_kind == "identity"


def test_pad_with_fewer_output_channels_is_refused():
    with pytest.raises(ConfigError, match="cannot go from 64 to 32 channels"):
        BasicBlock(64, 32, stride=2, shortcut="pad")


def test_unknown_shortcut_kind_is_refused():
    with pytest.raises(ConfigError, match="unknown shortcut kind 'skip'"):
        BasicBlock(16, 16, shortcut="skip")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: BasicBlock(0, 16), "in_channels must be an integer ≥ 1, got 0"),
        (lambda: BasicBlock(16, -4), "planes must be an integer ≥ 1, got -4"),
        (lambda: BasicBlock(16, 16, stride=2.0), "stride must be an integer ≥ 1, got 2.0"),
        (lambda: BasicBlock(16, 16, stride=0), "stride must be an integer ≥ 1, got 0"),
        (lambda: PreActBasicBlock(16.0, 16), "in_channels must be an integer ≥ 1"),
        (lambda: Bottleneck(64, 16, base_width=1), "= 0 channels in its 3×3"),
        (lambda: Bottleneck(64, 16, groups=0), "groups must be an integer ≥ 1, got 0"),
        (lambda: PreActBottleneck(64, 0), "planes must be an integer ≥ 1, got 0"),
        (lambda: BasicBlock(16, 16, shortcut=None), "unknown shortcut kind None"),
        (lambda: BasicBlock(16, 16, shortcut="pda"), r"\(did you mean pad\?\)"),
        (lambda: BasicBlock(8, 8, drop_path=-0.1), r"drop_path must be a number in \[0, 1\)"),
        (lambda: BasicBlock(8, 8, drop_path="0.1"), "drop_path must be a number"),
    ],
)
def test_impossible_blocks_are_config_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


# --- option A --------------------------------------------------------------------------------


def test_option_a_adds_no_parameters():
    padded = BasicBlock(16, 32, stride=2, shortcut="pad")
    plain = BasicBlock(16, 32, stride=2, shortcut="none")
    assert n_params(padded.downsample) == 0
    assert n_params(padded) == n_params(plain)


@pytest.mark.parametrize("size", [8, 7])
def test_option_a_subsamples_and_appends_zero_channels(size):
    x = torch.randn(2, 16, size, size, dtype=torch.float64)
    out = PadShortcut(16, 32, stride=2)(x)
    half = (size + 1) // 2
    assert out.shape == (2, 32, half, half)
    for i in range(half):
        for j in range(half):
            torch.testing.assert_close(out[:, :16, i, j], x[:, :, 2 * i, 2 * j])
    assert torch.count_nonzero(out[:, 16:]) == 0


@pytest.mark.parametrize("kind", ["pad", "projection", "avgpool"])
@pytest.mark.parametrize("size", [7, 8, 9])
def test_shortcut_and_residual_agree_on_odd_sizes(kind, size):
    block = BasicBlock(16, 32, stride=2, shortcut=kind).eval()
    x = torch.randn(1, 16, size, size)
    assert block.shortcut(x).shape == block.residual(x).shape == block(x).shape


# --- the forward equation, checked against float64 maths -----------------------------------


@pytest.mark.parametrize("kind", ["identity", "projection", "pad", "none"])
def test_basic_block_computes_relu_of_residual_plus_shortcut(kind):
    cout, stride = (16, 1) if kind == "identity" else (32, 2)
    block = BasicBlock(16, cout, stride, shortcut="auto" if kind == "identity" else kind)
    randomize_batchnorm(block)
    block = block.double().eval()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)

    h = F.relu(bn_ref(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    residual = bn_ref(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    if kind == "identity":
        shortcut = x
    elif kind == "projection":
        conv, bn = block.downsample
        shortcut = bn_ref(F.conv2d(x, conv.weight, stride=stride), bn)
    elif kind == "pad":
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, cout - 16))
    else:
        shortcut = torch.zeros_like(residual)
    with torch.no_grad():
        torch.testing.assert_close(block.residual(x), residual)
        torch.testing.assert_close(block(x), F.relu(residual + shortcut))


def test_bottleneck_puts_the_stride_on_the_3x3_and_expands_by_4():
    block = Bottleneck(256, 128, stride=2)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.out_channels == 512 and block.shortcut_kind == "projection"
    assert block(torch.randn(1, 256, 14, 14)).shape == (1, 512, 7, 7)


def test_bottleneck_groups_and_width_as_resnext():
    block = Bottleneck(256, 64, groups=32, base_width=4)
    assert block.conv2.groups == 32 and block.conv2.in_channels == 128  # 64·4/64·32
    assert block.shortcut_kind == "identity"


def test_preact_basic_block_matches_the_he_2016_equation():
    block = PreActBasicBlock(16, 32, stride=2)
    randomize_batchnorm(block)
    block = block.double().eval()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    pre = F.relu(bn_ref(x, block.bn1))
    h = F.relu(bn_ref(F.conv2d(pre, block.conv1.weight, stride=2, padding=1), block.bn2))
    residual = F.conv2d(h, block.conv2.weight, padding=1)
    shortcut = F.conv2d(pre, block.downsample.weight, stride=2)  # projection of the pre-activation
    with torch.no_grad():
        torch.testing.assert_close(block(x), residual + shortcut)  # no ReLU after the sum
        torch.testing.assert_close(block.shortcut(x), shortcut)
        torch.testing.assert_close(block.residual(x), residual)


def test_preact_projection_has_no_batchnorm():
    assert isinstance(PreActBottleneck(64, 64, stride=2).downsample, nn.Conv2d)


# --- zero init and stochastic depth ----------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [BasicBlock(32, 32), Bottleneck(128, 32), PreActBasicBlock(32, 32), PreActBottleneck(128, 32)],
    ids=["basic", "bottleneck", "preact_basic", "preact_bottleneck"],
)
@pytest.mark.parametrize("training", [True, False])
def test_zero_init_makes_a_fresh_block_an_identity_map(block, training):
    block.zero_init_residual()
    block.train(training)
    x = torch.rand(4, block.in_channels, 6, 6)  # non-negative, as after a ReLU
    with torch.no_grad():
        assert torch.equal(block(x), x)
        assert torch.count_nonzero(block.residual(x)) == 0


def test_without_zero_init_a_block_is_not_the_identity():
    block = BasicBlock(32, 32).eval()
    x = torch.rand(4, 32, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(block(x), x)


def test_drop_path_drops_whole_residuals_of_some_samples_in_training():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, drop_path=0.5)
    randomize_batchnorm(block)
    block.eval()  # fixed BN statistics; drop_path itself follows its own training flag
    block.drop_path.train()
    x = torch.randn(64, 8, 5, 5)
    with torch.no_grad():
        out = block(x)
        residual = block.residual(x)
    dropped = [torch.allclose(out[i], F.relu(x[i])) for i in range(64)]
    kept = [torch.allclose(out[i], F.relu(x[i] + residual[i] / 0.5), atol=1e-5) for i in range(64)]
    assert all(d or k for d, k in zip(dropped, kept, strict=True))
    assert 10 < sum(dropped) < 54  # about half of 64 samples


def test_drop_path_is_inactive_in_eval_mode():
    block = BasicBlock(8, 8, drop_path=0.9).eval()
    reference = BasicBlock(8, 8).eval()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(4, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(block(x), reference(x))


def _middle_activation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What reaches the second 3×3 convolution without dropout, written out."""
    if isinstance(block, PreActBasicBlock):
        return F.relu(bn_ref(block.conv1(F.relu(bn_ref(x, block.bn1))), block.bn2))
    return F.relu(bn_ref(block.conv1(x), block.bn1))


@pytest.mark.parametrize("unit", [BasicBlock, PreActBasicBlock])
def test_dropout_acts_between_the_two_convolutions_in_training_only(unit):
    # Zagoruyko & Komodakis 2016: dropout after the middle ReLU, before the second conv.
    torch.manual_seed(0)
    block = unit(8, 8, dropout=0.5)
    randomize_batchnorm(block)
    block.train()
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eval()  # fixed statistics, so the reference below is exact
    seen = []
    block.conv2.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        expected = _middle_activation(block, x)
        block(x)
        block.eval()
        block(x)
    trained, evaluated = seen
    kept = trained != 0
    torch.testing.assert_close(trained[kept], expected[kept] / 0.5)  # inverted dropout
    dropped = (expected > 0) & ~kept
    assert 0.4 < dropped.sum() / (expected > 0).sum() < 0.6
    torch.testing.assert_close(evaluated, expected)


def test_stochastic_depth_is_refused_for_a_plain_unit():
    # Dropping a plain unit's residual drops all it computes: nothing would be left.
    with pytest.raises(ConfigError, match="no shortcut to keep"):
        BasicBlock(8, 8, shortcut="none", drop_path=0.1)


def test_describe_shortcut_says_why():
    assert describe_shortcut(BasicBlock(64, 128, 2), in_size=56) == (
        "projection 1×1/2: 64→128 channels, 56→28 pixels"
    )
    assert describe_shortcut(BasicBlock(64, 64)) == "identity: shapes match"
    assert describe_shortcut(BasicBlock(16, 32, 2, shortcut="pad"), 32).startswith("option A pad")
