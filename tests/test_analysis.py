"""analysis: MAC counts against published tables, residual ratios against a float64 recomputation,
lesions against hand-built forwards, gradient norms against autograd in float64."""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resunit import analysis
from resunit.analysis import (
    ShortcutOnly,
    can_lesion,
    count_multiply_adds,
    counterparts,
    gradient_flow,
    input_shape_of,
    inspect_model,
    inspect_unit,
    layer_gradient_norms,
    lesion_study,
    lesioned,
    make_unit,
    mean_ratio_per_stage,
    parse_input_shape,
    residual_ratios,
    worst_lesion,
)
from resunit.data import load_dataset, normalize
from resunit.errors import ConfigError
from resunit.models import create_model, model_parameter_count


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def digits_batch(digits_test):
    return normalize(digits_test.images[:96], digits_test.mean, digits_test.std)


# --- inspect: published numbers ------------------------------------------------------------


def _conv_macs(cin: int, cout: int, kernel: int, out_size: int) -> int:
    return cin * cout * kernel * kernel * out_size * out_size


def _hand_counted_macs(name: str) -> int:
    """Multiply-accumulates of a ResNet counted from its definition, not from our modules:
    the convolutions (every output pixel, every input channel and kernel tap) and the
    classifier. ImageNet ResNets (He et al. 2015, Table 1) at 224×224, "v1.5" bottlenecks
    with the stride on the 3×3; CIFAR ResNets (§4.2) at 32×32 with option-A shortcuts (no
    arithmetic)."""
    imagenet = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                "resnet50": ("bottleneck", [3, 4, 6, 3]),
                "resnet101": ("bottleneck", [3, 4, 23, 3])}  # fmt: skip
    if name in imagenet:
        block, layers = imagenet[name]
        expansion = 4 if block == "bottleneck" else 1
        total, channels, size = _conv_macs(3, 64, 7, 112), 64, 56  # stem conv, then max-pool
        for stage, (units, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            for unit in range(units):
                stride = 2 if stage > 0 and unit == 0 else 1
                out = size // stride
                if block == "basic":
                    total += _conv_macs(channels, width, 3, out) + _conv_macs(width, width, 3, out)
                else:
                    total += _conv_macs(channels, width, 1, size)  # 1×1 before the stride
                    total += _conv_macs(width, width, 3, out)
                    total += _conv_macs(width, width * expansion, 1, out)
                if stride != 1 or channels != width * expansion:
                    total += _conv_macs(channels, width * expansion, 1, out)  # projection
                channels, size = width * expansion, out
        return total + channels * 1000
    n = (int(name.removeprefix("resnet")) - 2) // 6
    total, channels, size = _conv_macs(3, 16, 3, 32), 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for unit in range(n):
            size //= 2 if stage > 0 and unit == 0 else 1
            total += _conv_macs(channels, width, 3, size) + _conv_macs(width, width, 3, size)
            channels = width
    return total + channels * 10


@pytest.mark.parametrize(
    ("name", "published"),
    [("resnet18", 1.814e9), ("resnet34", 3.664e9), ("resnet50", 4.089e9), ("resnet101", 7.801e9),
     ("resnet20", 40.55e6), ("resnet56", None)],
)  # fmt: skip
def test_macs_equal_a_hand_count_and_the_published_figures(name, published):
    # Published: torchvision's model table ("GFLOPS", really GMACs, to 3 decimals); for
    # ResNet-20 the figure README quotes (He et al. give none for CIFAR).
    expected = _hand_counted_macs(name)
    if published is not None:
        assert expected == pytest.approx(published, rel=5e-4)
    result = inspect_model(meta_model(name))
    assert result["total_macs"] == expected
    assert count_multiply_adds(meta_model(name), tuple(result["input"])) == expected


@pytest.mark.parametrize("name", ["resnet50", "resnet20", "preact_resnet164", "wrn_16_4"])
def test_rows_add_up_to_the_totals(name):
    result = inspect_model(meta_model(name))
    rows = result["units"]
    assert sum(r["residual_macs"] + r["shortcut_macs"] for r in rows) == result["total_macs"]
    assert (
        sum(r["residual_params"] + r["shortcut_params"] for r in rows)
        == (result["total_parameters"])
    )
    assert result["total_parameters"] == model_parameter_count(name)
    assert [r["name"] for r in rows[1:-1]] == [n for n, _ in meta_model(name).named_units()]


def test_rows_say_which_shortcut_and_why():
    rows = {r["name"]: r for r in inspect_model(meta_model("resnet18"))["units"]}
    assert rows["layer1.0"]["shortcut_reason"] == "identity: shapes match"
    assert rows["layer2.0"]["shortcut_reason"] == "projection 1×1/2: 64→128 channels, 56→28 pixels"
    assert rows["layer2.0"]["input_shape"] == [64, 56, 56]
    assert rows["layer2.0"]["output_shape"] == [128, 28, 28]
    # The projection: 1×1 conv (64·128 weights) + BN (2·128), at 28·28 output positions.
    assert rows["layer2.0"]["shortcut_params"] == 64 * 128 + 2 * 128
    assert rows["layer2.0"]["shortcut_macs"] == 28 * 28 * 128 * 64

    cifar = {r["name"]: r for r in inspect_model(meta_model("resnet20"))["units"]}
    assert cifar["layer2.0"]["shortcut_reason"].startswith("option A pad: 16→32 channels")
    assert cifar["layer2.0"]["shortcut_params"] == cifar["layer2.0"]["shortcut_macs"] == 0


def test_custom_input_size_scales_macs_with_pixels():
    large = inspect_model(meta_model("resnet50"), (3, 448, 448))["total_macs"]
    # Convolutions scale with output pixels (four times as many); the classifier does not.
    fc = 2048 * 1000
    assert large - fc == 4 * (inspect_model(meta_model("resnet50"))["total_macs"] - fc)


def test_block_walk_of_the_56_to_28_example():
    with torch.device("meta"):
        unit = make_unit(64, 128, stride=2)
    walk = inspect_unit(unit, 56)
    steps = {(s["branch"], s["layer"]): s for s in walk["steps"]}
    conv1 = steps[("residual", "conv1")]
    assert conv1["input_shape"] == [64, 56, 56] and conv1["output_shape"] == [128, 28, 28]
    assert conv1["macs"] == 28 * 28 * 128 * 64 * 9  # outputs × inputs × 3·3, computed here
    assert steps[("residual", "conv2")]["macs"] == 28 * 28 * 128 * 128 * 9
    assert steps[("shortcut", "downsample.0")]["macs"] == 28 * 28 * 128 * 64
    assert walk["steps"][-1]["branch"] == "output"
    assert walk["total_macs"] == sum(s["macs"] for s in walk["steps"])
    assert walk["total_parameters"] == sum(s["params"] for s in walk["steps"])


@pytest.mark.parametrize(
    ("block", "in_channels", "out_channels", "stride"),
    [("preact_basic", 64, 128, 2), ("bottleneck", 256, 512, 2), ("preact_bottleneck", 64, 256, 1)],
)
def test_block_walk_counts_every_parameter_once(block, in_channels, out_channels, stride):
    with torch.device("meta"):
        unit = make_unit(in_channels, out_channels, stride, block)
    walk = inspect_unit(unit, 28)
    assert sum(s["params"] for s in walk["steps"]) == walk["total_parameters"]
    assert sum(s["macs"] for s in walk["steps"]) == walk["total_macs"]
    assert walk["output_shape"] == [out_channels, 28 // stride, 28 // stride]


def test_block_walk_rejects_impossible_units():
    with pytest.raises(ConfigError, match="multiple of 4"):
        make_unit(64, 130, block="bottleneck")
    with pytest.raises(ConfigError, match="unknown block"):
        make_unit(64, 128, block="dense")
    # A negative size is reported as such, not as "not a multiple of 4".
    with pytest.raises(ConfigError, match="must be ≥ 1, got 64, -130 and 1"):
        make_unit(64, -130, block="bottleneck")


def test_bottleneck_walk_lists_its_reused_relu_plainly():
    # Bottleneck.residual calls its one nn.ReLU after bn1 and after bn2: both steps are
    # ReLUs of the residual branch itself; nothing is shared with another branch.
    with torch.device("meta"):
        unit = make_unit(256, 512, 2, "bottleneck")
    steps = inspect_unit(unit, 28)["steps"]
    relus = [s for s in steps if s["layer"] == "relu"]
    assert [(s["branch"], s["module"], s["params"]) for s in relus] == [
        ("residual", "ReLU", 0),
        ("residual", "ReLU", 0),
    ]
    assert relus[0]["output_shape"] == [128, 28, 28] and relus[1]["output_shape"] == [128, 14, 14]
    assert not any("shared" in s["module"] for s in steps)


def test_preact_projection_walk_marks_the_bn_it_shares_with_the_residual_branch():
    # A pre-activation projection reads bn1+ReLU of the residual branch: the shortcut walk
    # passes bn1 again, says so, and counts its parameters once (in the residual branch).
    with torch.device("meta"):
        unit = make_unit(64, 128, 2, "preact_basic")
    steps = inspect_unit(unit, 28)["steps"]
    bn1 = [s for s in steps if s["layer"] == "bn1"]
    assert [(s["branch"], s["module"], s["params"]) for s in bn1] == [
        ("residual", "batch norm (64) + ReLU", 128),
        ("shortcut", "batch norm (64) + ReLU (shared with the residual branch)", 0),
    ]


@pytest.mark.parametrize(
    ("text", "shape"),
    [("3x224x224", (3, 224, 224)), ("3×224×224", (3, 224, 224)), ("3,32,32", (3, 32, 32)),
     (" 3X224X224 ", (3, 224, 224)), ("1×8×8", (1, 8, 8))],
)  # fmt: skip
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text.strip()) == shape


@pytest.mark.parametrize("text", ["224x224", "3x0x4", "axbxc", ""])
def test_parse_input_shape_rejects_nonsense(text):
    with pytest.raises(ConfigError, match=r"look like 3x224x224 \(an input shape C×H×W"):
        parse_input_shape(text)


def test_input_channels_must_match_the_model():
    # The message names the argument for API callers and the flag for CLI users.
    with pytest.raises(ConfigError, match=r"3 input channels .*input_shape, --input"):
        inspect_model(meta_model("resnet20"), (1, 32, 32))


def test_unit_errors_name_the_arguments_and_the_flags():
    with pytest.raises(ConfigError, match=r"\(in_channels, out_channels, stride\)"):
        make_unit(0, 64)
    with pytest.raises(ConfigError, match=r"out_channels \(--out-channels\) must be a multiple"):
        make_unit(64, 130, block="bottleneck")
    with torch.device("meta"):
        unit = make_unit(64, 128)
    with pytest.raises(ConfigError, match=r"size: the input's height and width"):
        inspect_unit(unit, 0)


def test_input_shape_of_a_model():
    assert input_shape_of(meta_model("resnet50")) == (3, 224, 224)
    assert input_shape_of(meta_model("resnet20", in_chans=1)) == (1, 32, 32)


# --- counting in any dtype, on any device -----------------------------------------------------


def _basic_unit_macs(cin: int, cout: int, out_pixels: int) -> int:
    """Hand count of a projection BasicBlock: two 3×3 convs and a 1×1 conv, per output pixel."""
    return out_pixels * cout * (cin * 9 + cout * 9 + cin)


@pytest.mark.parametrize("where", ["float32", "float64", "meta"])
def test_count_multiply_adds_in_any_dtype_and_on_meta(where):
    if where == "meta":
        with torch.device("meta"):
            unit = make_unit(16, 32, stride=2)
    else:
        unit = make_unit(16, 32, stride=2).to(getattr(torch, where))
    assert count_multiply_adds(unit, (16, 8, 8)) == _basic_unit_macs(16, 32, 4 * 4)


def test_float64_models_inspect_like_float32_ones():
    # The example input takes the model's dtype: no "expected scalar type Float" error.
    model = create_model("resnet20").double()
    result = inspect_model(model)
    assert result["total_macs"] == inspect_model(meta_model("resnet20"))["total_macs"]
    assert count_multiply_adds(model, (3, 32, 32)) == result["total_macs"]
    walk = inspect_unit(make_unit(16, 32, stride=2).double(), 8)
    assert walk["total_macs"] == _basic_unit_macs(16, 32, 4 * 4)


# --- every function leaves the model's train/eval modes as they were ----------------------------


def _mixed_modes(model):
    """Train mode with one BN frozen in eval mode, as when fine-tuning: a single model-wide
    flag cannot restore this."""
    model.train()
    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()
    return [m.training for m in model.modules()]


def test_inspection_restores_every_module_mode():
    model = create_model("resnet20", num_classes=10, in_chans=1)
    modes = _mixed_modes(model)
    inspect_model(model, (1, 8, 8))
    assert [m.training for m in model.modules()] == modes
    unit = make_unit(16, 32, stride=2)
    unit_modes = _mixed_modes(unit)
    inspect_unit(unit, 8)
    assert [m.training for m in unit.modules()] == unit_modes


def test_modes_are_restored_when_the_work_fails(monkeypatch, digits_batch):
    model = create_model("resnet20", num_classes=10, in_chans=1)
    modes = _mixed_modes(model)
    with pytest.raises(RuntimeError):  # 3-channel images into a 1-channel model
        residual_ratios(model, [torch.zeros(2, 3, 8, 8)])
    assert [m.training for m in model.modules()] == modes

    def fail(*args):
        raise RuntimeError("counter failed")

    monkeypatch.setattr(analysis, "count_macs", fail)
    with pytest.raises(RuntimeError, match="counter failed"):
        inspect_model(model, (1, 8, 8))
    assert [m.training for m in model.modules()] == modes


def test_residual_ratios_and_gradient_norms_restore_modes(digits_test, digits_batch):
    model = create_model("resnet20", num_classes=10, in_chans=1)
    modes = _mixed_modes(model)
    residual_ratios(model, [digits_batch[:8]])
    assert [m.training for m in model.modules()] == modes
    model.eval()
    layer_gradient_norms(model, digits_batch[:8], digits_test.labels[:8])
    assert not any(m.training for m in model.modules())


# --- residual ratios -----------------------------------------------------------------------


def _basic_residual_float64(unit, x):
    """F(x) of a BasicBlock recomputed from its weights with functional ops, in float64."""

    def bn(bn_module, y):
        return F.batch_norm(y, bn_module.running_mean.double(), bn_module.running_var.double(),
                            bn_module.weight.double(), bn_module.bias.double(), False, 0.0,
                            bn_module.eps)  # fmt: skip

    y = F.conv2d(x, unit.conv1.weight.double(), stride=unit.stride, padding=1)
    y = F.relu(bn(unit.bn1, y))
    y = F.conv2d(y, unit.conv2.weight.double(), padding=1)
    return bn(unit.bn2, y)


def test_residual_ratio_matches_a_float64_recomputation(digits_batch):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    # Non-trivial BN statistics, as a trained model has, so eval mode is not the identity.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(digits_batch)
    model.eval()
    rows = residual_ratios(model, [digits_batch[:50], digits_batch[50:]])

    inputs = {}
    hooks = [unit.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
             for name, unit in model.named_units()]  # fmt: skip
    with torch.no_grad():
        model(digits_batch)
    for h in hooks:
        h.remove()
    for row, (name, unit) in zip(rows, model.named_units(), strict=True):
        x = inputs[name].double()
        with torch.no_grad():
            residual = _basic_residual_float64(unit, x)
        ratio = (residual.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean()
        assert row["name"] == name
        assert row["residual_ratio"] == pytest.approx(float(ratio), rel=1e-4)
        assert row["residual_std"] == pytest.approx(float(residual.std(unbiased=False)), rel=1e-4)


def test_zero_initialised_units_are_exactly_the_identity(digits_batch):
    model = create_model("resnet20", num_classes=10, in_chans=1, zero_init_residual=True).eval()
    rows = residual_ratios(model, [digits_batch])
    assert all(r["residual_ratio"] == 0.0 and r["residual_std"] == 0.0 for r in rows)
    assert list(mean_ratio_per_stage(rows)) == ["layer1", "layer2", "layer3"]


def test_mean_ratio_per_stage_averages_within_stages():
    rows = [{"stage": "layer1", "residual_ratio": 1.0}, {"stage": "layer1", "residual_ratio": 0.5},
            {"stage": "layer2", "residual_ratio": 0.2}]  # fmt: skip
    assert mean_ratio_per_stage(rows) == {"layer1": 0.75, "layer2": 0.2}


# --- lesion ---------------------------------------------------------------------------------


def _with_statistics(unit, seed=0):
    """Non-trivial BN statistics and affine parameters, as a trained unit has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g))
    return unit.eval()


def _without_residual(unit):
    """A copy whose residual branch computes exactly 0: its last BN's scale and shift zeroed
    (post-activation), or its last conv zeroed (pre-activation units end with a conv)."""
    unit = copy.deepcopy(unit)
    with torch.no_grad():
        if unit.preactivation:
            last = unit.conv3 if hasattr(unit, "conv3") else unit.conv2
            last.weight.zero_()
        else:
            last = unit.bn3 if hasattr(unit, "bn3") else unit.bn2
            last.weight.zero_()
            last.bias.zero_()
    return unit


@pytest.mark.parametrize(
    ("block", "in_channels", "out_channels", "stride", "shortcut"),
    [
        ("basic", 16, 32, 2, "projection"),
        ("bottleneck", 32, 64, 2, "projection"),
        ("bottleneck", 64, 64, 1, "avgpool"),  # identity (shapes match)
        ("preact_basic", 16, 32, 2, "projection"),
        ("preact_bottleneck", 64, 64, 1, "auto"),
    ],
)
def test_lesioned_unit_is_the_unit_with_a_zero_residual(
    block, in_channels, out_channels, stride, shortcut
):
    torch.manual_seed(0)
    unit = _with_statistics(make_unit(in_channels, out_channels, stride, block, shortcut))
    # Inputs of both signs: a pre-activation unit reads the previous sum, not a ReLU output.
    x = torch.randn(2, in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    with torch.no_grad():
        expected = _without_residual(unit)(x.clone())
        assert not torch.equal(expected, unit(x.clone()))  # F(x) really was removed
        actual = ShortcutOnly(unit)(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert torch.equal(x, before), "the lesion never writes into its input"
    if not unit.preactivation and unit.downsample is not None:
        # The projection's BN output has negative values; the ReLU after the sum removes them.
        assert actual.min() == 0 and unit.shortcut(x).min() < 0


def test_lesion_of_a_plain_unit_is_the_identity():
    unit = make_unit(16, 16, shortcut="none").eval()
    x = torch.randn(1, 16, 4, 4)
    assert ShortcutOnly(unit)(x) is x


def test_lesion_replaces_a_unit_by_its_shortcut_and_restores_it(digits_batch):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        intact = model(digits_batch)
        with lesioned(model, "layer2.0"):
            cut = model(digits_batch)
        # The same network by hand: layer2.0 becomes option A (every 2nd pixel, zero channels).
        x = model.layer1(model.forward_stem(digits_batch))
        x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))
        x = model.layer3(model.layer2[1:](x))
        expected = model.forward_head(x)
        again = model(digits_batch)
    torch.testing.assert_close(cut, expected)
    assert not torch.allclose(cut, intact)
    assert torch.equal(again, intact)


@pytest.mark.parametrize("name", ["layer9.0", "layer1.9", "layer1", "fc"])
def test_lesioning_a_unit_the_model_lacks_is_a_config_error(name):
    model = create_model("resnet20", num_classes=10, in_chans=1)
    with (
        pytest.raises(ConfigError, match=rf"no unit '{name}' in this model.*layer1\.0 … layer3\.2"),
        lesioned(model, name),
    ):
        pass


def test_removing_a_zero_initialised_unit_changes_nothing(digits_test):
    # F(x) = 0 and x ≥ 0 after a ReLU, so relu(F(x) + x) = x: every lesion is invisible,
    # in the logits themselves, not only in the accuracy.
    model = create_model("resnet20", num_classes=10, in_chans=1, zero_init_residual=True).eval()
    result = lesion_study(model, digits_test)
    assert all(r["drop"] == 0.0 for r in result["units"])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        intact = model(x)
        for name, _ in model.named_units():
            with lesioned(model, name):
                torch.testing.assert_close(model(x), intact, rtol=0, atol=0)


def test_removing_a_unit_whose_residual_is_not_zero_changes_the_logits():
    # The converse of the test above: where F(x) ≠ 0 the lesion must show.
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        intact = model(x)
        with lesioned(model, "layer2.1"):
            assert not torch.allclose(model(x), intact)


def test_plain_units_that_change_shape_cannot_be_removed(digits_test):
    torch.manual_seed(0)
    model = create_model("plain20", num_classes=10, in_chans=1).eval()
    result = lesion_study(model, digits_test)
    na = [r["name"] for r in result["units"] if r["accuracy"] is None]
    assert na == ["layer2.0", "layer3.0"]
    assert not can_lesion(model.layer2[0]) and can_lesion(model.layer2[1])
    with pytest.raises(ConfigError, match="cannot be removed"), lesioned(model, "layer3.0"):
        pass
    for row in result["units"]:
        if row["accuracy"] is not None:
            assert row["drop"] == pytest.approx(result["intact_accuracy"] - row["accuracy"])
    worst = worst_lesion(result)
    assert worst["drop"] == max(r["drop"] for r in result["units"] if r["drop"] is not None)


# --- gradient flow --------------------------------------------------------------------------


def test_counterparts_pair_residual_and_plain():
    assert {v: c[0] for v, c in counterparts("resnet20").items()} == {
        "residual": "resnet20",
        "plain": "resnet20 without shortcuts",
    }
    assert {v: c[1] for v, c in counterparts("plain56").items()} == {
        "residual": "resnet56",
        "plain": "plain56",
    }
    assert counterparts("resnet18")["plain"][2] == {"shortcut": "none"}
    # Options that zero residual branches stay with the residual version: without shortcuts
    # they would zero the network (and are refused), so the plain baseline is the paper's.
    options = {"zero_init_residual": True, "drop_path_rate": 0.1, "in_chans": 1}
    pair = counterparts("resnet20", **options)
    assert pair["residual"][2] == options
    assert pair["plain"][2] == {"in_chans": 1, "shortcut": "none"}


def test_gradient_flow_of_a_zero_initialised_network_has_a_live_plain_twin(digits_batch):
    labels = torch.arange(len(digits_batch)) % 10
    result = gradient_flow("resnet20", digits_batch, labels, zero_init_residual=True)
    assert all(row["grad_norm"] > 0 for row in result["plain"] if row["layer"] != "fc")


def test_gradient_norms_match_autograd_in_float64(digits_test, digits_batch):
    labels = digits_test.labels[:96]
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    reference = create_model("resnet20", num_classes=10, in_chans=1).double()
    reference.load_state_dict(model.state_dict())
    rows = layer_gradient_norms(model, digits_batch, labels)

    reference.train()
    loss = F.cross_entropy(reference(digits_batch.double()), labels)
    weights = {n.removesuffix(".weight"): p for n, p in reference.named_parameters()
               if p.ndim > 1}  # fmt: skip
    grads = torch.autograd.grad(loss, list(weights.values()))
    expected = {name: float(g.norm()) for name, g in zip(weights, grads, strict=True)}
    # resnet20 (option A): 19 convolutions and the classifier, input to output.
    assert [r["layer"] for r in rows] == list(expected)
    assert len(rows) == 20 and rows[0]["layer"] == "conv1" and rows[-1]["layer"] == "fc"
    for row in rows:
        assert row["grad_norm"] == pytest.approx(expected[row["layer"]], rel=1e-3)


def test_gradient_flow_compares_same_layers_of_both_versions(digits_test, digits_batch):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    flow = gradient_flow("resnet20", digits_batch, digits_test.labels[:96], num_classes=10,
                         in_chans=1, seed=5)  # fmt: skip
    # The caller's random stream goes on as if gradient_flow had not run.
    assert torch.equal(torch.get_rng_state(), state)
    assert flow["labels"] == {"residual": "resnet20", "plain": "resnet20 without shortcuts"}
    assert [r["layer"] for r in flow["residual"]] == [r["layer"] for r in flow["plain"]]
    assert all(r["grad_norm"] > 0 for r in flow["residual"] + flow["plain"])
    # Seeded as torch.manual_seed(seed) would: the same initialisation, the same norms.
    torch.manual_seed(5)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    assert flow["residual"] == layer_gradient_norms(model, digits_batch, digits_test.labels[:96])


def test_gradient_flow_builds_models_for_the_images_channels(digits_test, digits_batch):
    labels = digits_test.labels[:96]
    inferred = gradient_flow("resnet20", digits_batch, labels, num_classes=10, seed=5)
    given = gradient_flow("resnet20", digits_batch, labels, num_classes=10, in_chans=1, seed=5)
    assert inferred == given  # 1-channel digits: in_chans=1 without being told
    model = create_model("resnet20", num_classes=10, in_chans=1)
    with pytest.raises(ConfigError, match=r"takes a model name .* got a ResNet$"):
        gradient_flow(model, digits_batch, labels)


def test_residual_ratios_refuse_one_tensor_for_a_list_of_batches(digits_batch):
    model = create_model("resnet20", num_classes=10, in_chans=1)
    with pytest.raises(ConfigError, match="not one tensor: pass \\[batch\\]"):
        residual_ratios(model, digits_batch)
    with pytest.raises(ConfigError, match="each batch must be an N×C×H×W tensor, got 1×8×8"):
        residual_ratios(model, [digits_batch[0]])
    assert len(residual_ratios(model, [digits_batch])) == 9  # the right call works


# --- plots: atomic, closed, one-line errors ----------------------------------------------------


@pytest.fixture
def pyplot():
    pytest.importorskip("matplotlib")
    from resunit import plots

    plt = plots._pyplot()
    plt.close("all")
    return plt


def test_plot_is_written_whole_and_its_figure_closed(tmp_path, pyplot):
    from resunit.plots import plot_gradient_flow

    rows = [{"index": 0, "grad_norm": 1.0}, {"index": 1, "grad_norm": 0.5}]
    # No .png suffix: the format is PNG whatever the name says.
    path = plot_gradient_flow({"net": rows}, tmp_path / "sub" / "flow.image")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["flow.image"]
    assert pyplot.get_fignums() == []


def test_a_failed_plot_is_one_config_error_and_leaves_nothing(tmp_path, pyplot, monkeypatch):
    from matplotlib.figure import Figure

    from resunit.plots import plot_gradient_flow

    rows = [{"index": 0, "grad_norm": 1.0}]
    target = tmp_path / "flow.png"
    target.write_bytes(b"previous")

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(ConfigError, match=r"cannot write the plot .*No space left on device"):
        plot_gradient_flow({"net": rows}, target)
    assert target.read_bytes() == b"previous"  # the old file, and no temporary beside it
    assert [p.name for p in tmp_path.iterdir()] == ["flow.png"]
    assert pyplot.get_fignums() == []

    monkeypatch.undo()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the plot"):
        plot_gradient_flow({"net": rows}, blocker / "flow.png")
    assert pyplot.get_fignums() == []
