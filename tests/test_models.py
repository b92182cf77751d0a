"""The model zoo: published parameter counts, torchvision compatibility, shortcut placement."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resunit.errors import ConfigError
from resunit.models import (
    MAX_SCRIPTABLE_STAGES,
    ModelSpec,
    ResNet,
    count_parameters,
    create_model,
    get_model_spec,
    list_models,
    model_parameter_count,
)

TORCHVISION = json.loads(
    (Path(__file__).parent / "data" / "torchvision_state_dicts.json").read_text()
)["models"]

# torchvision's model table (https://pytorch.org/vision/stable/models.html).
PUBLISHED_IMAGENET = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
}
# He et al. 2015, Table 6 ("0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M"), counted exactly.
PUBLISHED_CIFAR = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
}


@pytest.mark.parametrize(("name", "count"), PUBLISHED_IMAGENET.items())
def test_imagenet_parameter_counts_match_torchvision(name, count):
    assert model_parameter_count(name) == count


@pytest.mark.parametrize(("name", "count"), PUBLISHED_CIFAR.items())
def test_cifar_parameter_counts_match_the_paper(name, count):
    assert model_parameter_count(name) == count


@pytest.mark.parametrize("name", PUBLISHED_CIFAR)
def test_option_b_adds_2752_parameters(name):
    # Two projections: 16→32 (512 + 64 BN) and 32→64 (2,048 + 128 BN).
    assert model_parameter_count(name, shortcut="B") - PUBLISHED_CIFAR[name] == 2_752
    assert model_parameter_count(name, shortcut="auto") - PUBLISHED_CIFAR[name] == 2_752


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_nets_have_the_same_layers_without_shortcuts(depth):
    plain = create_model(f"plain{depth}")
    residual = create_model(f"resnet{depth}")
    assert all(unit.shortcut_kind == "none" for unit in plain.units())
    assert count_parameters(plain) == count_parameters(residual)  # option A is parameter-free
    weighted = [m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth  # "6n+2 stacked weighted layers"


def _wide_resnet_parameters(depth: int, k: int, classes: int = 10) -> int:
    """WRN-depth-k counted from the paper's definition: a 3×3 conv to 16 channels, three
    stages of (depth − 4) / 6 pre-activation basic units 16k, 32k, 64k wide (BN–ReLU–conv
    twice; a BN-less 1×1 projection where the width or resolution changes), a final BN and
    the classifier."""
    total, channels = 3 * 16 * 9, 16
    for width in (16 * k, 32 * k, 64 * k):
        for unit in range((depth - 4) // 6):
            total += 2 * channels + channels * width * 9 + 2 * width + width * width * 9
            if unit == 0:  # every stage's first unit widens (and, after the first, strides)
                total += channels * width
            channels = width
    return total + 2 * channels + channels * classes + classes


@pytest.mark.parametrize(
    ("depth", "k", "millions"), [(16, 4, 2.7), (16, 8, 11.0), (28, 10, 36.5), (40, 4, 8.9)]
)
def test_wide_resnets_match_their_definition_and_the_published_sizes(depth, k, millions):
    # Zagoruyko & Komodakis 2016, Tables 3-4: WRN-16-4 2.7M, WRN-16-8 11.0M, WRN-28-10
    # 36.5M, WRN-40-4 8.9M.
    count = model_parameter_count(f"wrn_{depth}_{k}")
    assert count == _wide_resnet_parameters(depth, k)
    assert round(count / 1e6, 1) == millions


def test_other_published_sizes():
    # He et al. 2016: pre-activation ResNet-164 1.7M, ResNet-1001 10.2M.
    assert round(model_parameter_count("preact_resnet164") / 1e6, 1) == 1.7
    assert abs(model_parameter_count("preact_resnet1001") / 1e6 - 10.2) < 0.15


# --- torchvision compatibility ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_state_dict_keys_and_shapes_equal_torchvision(name):
    with torch.device("meta"):
        model = create_model(name)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == TORCHVISION[name]["state_dict"]
    assert count_parameters(model) == TORCHVISION[name]["parameters"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_weights_load_strictly_and_give_the_same_logits(name):
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)().eval()
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


class _ReferenceBasic(nn.Module):
    """torchvision's BasicBlock, written out again here as the independent reference."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _ReferenceBottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3×3), written out again."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, groups=1, base_width=64):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _ReferenceResNet(nn.Module):
    """torchvision's ResNet as its paper and docs describe it: 7×7/2 stem, max-pool, four
    stages (a 1×1 projection + BN where the shape changes), average pool, fc."""

    def __init__(self, block, layers, groups=1, width_per_group=64):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            units = []
            for j in range(blocks):
                downsample = None
                if j == 0 and (stride != 1 or self.inplanes != planes * block.expansion):
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                units.append(
                    block(self.inplanes, planes, stride if j == 0 else 1, downsample, groups,
                          width_per_group)
                )  # fmt: skip
                self.inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_REFERENCES = {
    "resnet18": (_ReferenceBasic, [2, 2, 2, 2], {}),
    "resnet34": (_ReferenceBasic, [3, 4, 6, 3], {}),
    "resnet50": (_ReferenceBottleneck, [3, 4, 6, 3], {}),
    "resnext50_32x4d": (_ReferenceBottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "wide_resnet50_2": (_ReferenceBottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
}


@pytest.mark.parametrize("name", sorted(_REFERENCES))
def test_a_second_implementation_takes_our_weights_strictly_and_gives_the_same_logits(name):
    # Runs without torchvision: the reference above is torchvision's architecture written
    # out independently, with its module names, so a strict load also checks every key.
    block, layers, options = _REFERENCES[name]
    torch.manual_seed(0)
    ours = create_model(name).eval()
    reference = _ReferenceResNet(block, layers, **options).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert list(reference.state_dict()) == list(ours.state_dict())  # the same order, too
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


# --- where identity and projection shortcuts go ----------------------------------------------


def expected_shortcut(model: ResNet, unit: nn.Module) -> str:
    """The rule, restated: identity exactly when shapes match, otherwise the model's kind."""
    if model.shortcut_kind == "none":
        return "none"
    if model.shortcut_kind == "projection":
        return "projection"
    if unit.in_channels == unit.out_channels and unit.stride == 1:
        return "identity"
    return {"auto": "projection"}.get(model.shortcut_kind, model.shortcut_kind)


@pytest.mark.parametrize("name", list_models())
def test_shortcut_of_every_unit_follows_the_rule(name):
    with torch.device("meta"):
        model = create_model(name)
    units = list(model.named_units())
    for _, unit in units:
        assert unit.shortcut_kind == expected_shortcut(model, unit)
        has_parameters = (
            any(True for _ in unit.downsample.parameters()) if unit.downsample else False
        )
        assert has_parameters == (unit.shortcut_kind in ("projection", "avgpool"))
    # Only the first unit of a stage may change shape; every other unit is identity-shaped.
    for prefix, unit in units:
        if not prefix.endswith(".0"):
            assert unit.in_channels == unit.out_channels and unit.stride == 1


def test_imagenet_projections_sit_exactly_where_torchvision_downsamples():
    for name in TORCHVISION:
        expected = {
            k.split(".downsample")[0]
            for k, _ in TORCHVISION[name]["state_dict"]
            if ".downsample." in k
        }
        with torch.device("meta"):
            model = create_model(name)
        ours = {
            prefix for prefix, unit in model.named_units() if unit.shortcut_kind == "projection"
        }
        assert ours == expected, name


def test_cifar_option_a_pads_only_at_the_two_stage_transitions():
    kinds = {p: u.shortcut_kind for p, u in create_model("resnet20").named_units()}
    assert [p for p, k in kinds.items() if k == "pad"] == ["layer2.0", "layer3.0"]
    assert all(k == "identity" for p, k in kinds.items() if p not in ("layer2.0", "layer3.0"))


def test_option_c_projects_every_unit():
    model = create_model("resnet20", shortcut="C")
    assert all(unit.shortcut_kind == "projection" for unit in model.units())


# --- every model runs, in any size ------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_forward_and_backward_and_gradients_reach_the_first_layer(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    family = get_model_spec(name).family
    x = torch.randn(2, 3, 32 if family == "imagenet" else 8, 32 if family == "imagenet" else 8)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grad = model.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet18", (1, 3, 37, 53)), ("resnet20", (3, 1, 8, 8))]
)
def test_any_input_size_and_grayscale(name, shape):
    model = create_model(name, num_classes=5, in_chans=shape[1]).eval()
    assert model(torch.randn(*shape)).shape == (shape[0], 5)


def test_features_and_head_compose_to_forward():
    model = create_model("resnet56").eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
        torch.testing.assert_close(model.forward_head(maps[-1]), model(x))
        assert model.forward_head(maps[-1], pre_logits=True).shape == (2, 64)


def test_preact_features_end_with_the_final_bn_relu():
    model = create_model("wrn_16_4").eval()
    maps = model.features(torch.randn(1, 3, 16, 16))
    assert maps[-1].min() >= 0  # after the final ReLU
    assert maps[-1].shape[1] == model.num_features == 256


def test_reset_classifier():
    model = create_model("resnet18").eval()
    model.reset_classifier(3)
    assert model.fc.out_features == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 512)


def test_reset_classifier_follows_the_model_dtype():
    model = create_model("resnet20").double().eval()
    model.reset_classifier(5)
    assert model.fc.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 5)
    with torch.device("meta"):
        model = create_model("resnet20")
    model.reset_classifier(4)
    assert model.fc.weight.device.type == "meta"


@pytest.mark.parametrize("num_classes", [-1, 2.5, True])
def test_reset_classifier_refuses_a_bad_class_count(num_classes):
    model = create_model("resnet20")
    with pytest.raises(ConfigError, match="num_classes must be an integer ≥ 0"):
        model.reset_classifier(num_classes)
    assert model.fc.out_features == 10  # the old head is kept


def test_count_parameters_counts_frozen_ones_unless_asked_not_to():
    model = create_model("resnet20")
    total = count_parameters(model)
    model.conv1.weight.requires_grad_(False)
    assert count_parameters(model) == total == PUBLISHED_CIFAR["resnet20"]
    assert count_parameters(model, trainable_only=True) == total - model.conv1.weight.numel()


def test_zero_init_residual_zeroes_every_last_bn():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(torch.count_nonzero(u.bn3.weight) == 0 for u in model.units())
    assert all(torch.count_nonzero(u.bn1.weight) > 0 for u in model.units())


def test_drop_path_rate_grows_linearly_with_depth():
    model = create_model("resnet20", drop_path_rate=0.2)
    rates = [u.drop_path.drop_prob for u in model.units()]
    # Huang et al. 2016's linear decay rule: 0 for the first unit, the rate for the last.
    assert rates == pytest.approx([0.2 * i / 8 for i in range(9)])


# --- pre-activation with the ImageNet stem ----------------------------------------------------


def test_preact_imagenet_stem_normalises_before_the_max_pool():
    # He et al. 2016 / fb.resnet.torch preresnet: conv → BN → ReLU → max-pool.
    model = ResNet("preact_bottleneck", [1, 1], widths=(8, 16), stem="imagenet", num_classes=3)
    randomize = torch.Generator().manual_seed(0)
    model.bn1.weight.data.uniform_(0.5, 1.5, generator=randomize)
    model.bn1.bias.data.normal_(generator=randomize)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_stem(x), expected)
    assert list(model.state_dict())[:2] == ["conv1.weight", "bn1.weight"]


def test_preact_first_unit_after_the_imagenet_stem_has_no_activation_of_its_own():
    # He et al. 2016 §4: the first unit takes "the first activation right after conv1",
    # which the ImageNet stem has applied before its max-pool (fb.resnet.torch: no_preact).
    torch.manual_seed(0)
    model = ResNet("preact_bottleneck", [2, 1], widths=(8, 16), stem="imagenet").eval()
    first, second = model.layer1
    assert first.bn1 is None and not any(k.startswith("layer1.0.bn1") for k in model.state_dict())
    assert second.bn1 is not None
    x = torch.relu(torch.randn(2, 64, 8, 8))  # a stem's output: BN–ReLU, then max-pooled
    with torch.no_grad():
        out = first.conv1(x)
        out = first.conv2(torch.relu(first.bn2(out)))
        out = first.conv3(torch.relu(first.bn3(out)))
        torch.testing.assert_close(first(x), out + first.downsample(x))


def test_preact_first_unit_after_a_bare_conv_shares_its_activation_with_the_shortcut():
    # After the CIFAR stem's bare convolution the first unit's BN–ReLU comes before the split
    # (fb.resnet.torch: both_preact), also where its shortcut is the identity; later units
    # keep the raw sum on the shortcut.
    torch.manual_seed(0)
    model = create_model("preact_resnet110").eval()
    first, second = model.layer1[0], model.layer1[1]
    for bn in (first.bn1, second.bn1):  # BN away from the identity, so the two differ
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for unit, shortcut_reads_activated in ((first, True), (second, False)):
            activated = torch.relu(unit.bn1(x))
            residual = unit.conv2(torch.relu(unit.bn2(unit.conv1(activated))))
            expected = residual + (activated if shortcut_reads_activated else x)
            torch.testing.assert_close(unit(x), expected)
            torch.testing.assert_close(unit.shortcut(x), expected - residual)


def test_a_custom_pre_activation_unit_without_the_option_still_builds():
    # A unit written against PreActUnit before input_activation existed sets its own BN.
    from resunit.blocks import PreActUnit, conv3x3

    class OneConvUnit(PreActUnit):
        def __init__(self, in_channels, planes, stride=1, shortcut="auto", groups=1,
                     base_width=64, drop_path=0.0):  # fmt: skip
            super().__init__(in_channels, planes, stride, shortcut, drop_path)
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.conv1 = conv3x3(in_channels, planes, stride)
            self._attach_shortcut()

        def residual_from_preactivated(self, out):
            return self.conv1(out)

    model = ResNet(OneConvUnit, [1, 1], widths=(8, 16), stem="cifar", num_classes=3).eval()
    assert model.layer1[0].input_activation == "residual"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        unit, stem = model.layer1[0], model.forward_stem(x)
        # Its own placement, as before: the identity shortcut carries the raw input.
        assert unit.downsample is None
        torch.testing.assert_close(unit(stem), unit.conv1(torch.relu(unit.bn1(stem))) + stem)


@pytest.mark.parametrize("option", [{"zero_init_residual": True}, {"drop_path_rate": 0.1}])
def test_options_that_zero_residuals_are_refused_for_plain_networks(option):
    # A plain unit is its residual: zeroing it zeroes the network's features and gradients.
    with pytest.raises(ConfigError, match="plain network"):
        create_model("plain20", **option)
    create_model("resnet20", **option)  # with shortcuts the same option is fine


def test_dropout_is_refused_where_a_unit_has_no_place_for_it():
    with pytest.raises(ConfigError, match="Bottleneck units have no such place"):
        create_model("resnet50", dropout=0.3)
    with pytest.raises(ConfigError, match=r"dropout must be a number in \[0, 1\)"):
        create_model("wrn_16_4", dropout=1.0)
    model = create_model("wrn_16_4", dropout=0.3)
    assert {unit.dropout for unit in model.units()} == {0.3}


@pytest.mark.parametrize("name", list_models("cifar-preact") + list_models("cifar-wide"))
def test_registered_preact_models_keep_a_bare_conv_stem(name):
    with torch.device("meta"):
        model = create_model(name)
    assert model.stem_type == "cifar" and not hasattr(model, "bn1")


# --- TorchScript ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script itself is deprecated
@pytest.mark.parametrize(
    "build",
    [
        lambda: create_model("resnet20"),
        lambda: create_model("resnet18", num_classes=5),
        lambda: ResNet("preact_bottleneck", [1, 2], widths=(8, 16), stem="imagenet"),
        lambda: ResNet("preact_basic", [1, 1, 1, 1, 1], widths=(4,) * 5, stem="cifar"),
    ],
    ids=["resnet20", "resnet18", "preact-imagenet-stem", "five-stages"],
)
def test_scripted_model_equals_eager(build):
    torch.manual_seed(0)
    model = build().eval()
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_scripting_refuses_more_stages_than_it_can_name():
    n = MAX_SCRIPTABLE_STAGES + 1
    model = ResNet("basic", [1] * n, widths=(4,) * n, stem="cifar")
    with torch.no_grad():  # eager runs every stage
        assert model.eval()(torch.randn(1, 3, 4, 4)).shape == (1, 1000)
    with pytest.raises(ConfigError, match=r"use torch\.jit\.trace or torch\.export"):
        torch.jit.script(model)


# --- the registry cannot be changed by its readers ------------------------------------------


def test_registry_specs_are_read_only():
    spec = get_model_spec("resnet20")
    with pytest.raises(TypeError):
        spec.kwargs["layers"] = [1, 1, 1]
    with pytest.raises(TypeError):
        spec.kwargs["layers"][0] = 1
    options = dict(spec.kwargs)  # the documented way to start from a spec: a copy to change
    options["layers"] = [1, 1, 1]
    assert count_parameters(ResNet(**options)) < PUBLISHED_CIFAR["resnet20"]
    assert get_model_spec("resnet20").kwargs["layers"] == (3, 3, 3)
    assert count_parameters(create_model("resnet20")) == PUBLISHED_CIFAR["resnet20"]


def test_model_spec_freezes_what_it_is_given():
    layers = [1, 2]
    spec = ModelSpec("x", "test", "", {"layers": layers, "nested": {"a": [1]}})
    layers.append(3)
    assert spec.kwargs["layers"] == (1, 2)
    with pytest.raises(TypeError):
        spec.kwargs["nested"]["a"] = 2


# --- errors ----------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean resnet50"):
        create_model("resnt50")


def test_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot build 'resnet20'"):
        create_model("resnet20", colour="red")


def test_impossible_pad_configuration_is_refused():
    # A bottleneck's 64-channel stem into a 64·4 stage is fine; 256 → 128 is not padding.
    with pytest.raises(ConfigError, match="pad"):
        ResNet("basic", [1, 1], widths=(64, 32), stem="cifar", shortcut="pad")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block": "Bottleneck"}, r"unknown block 'Bottleneck' \(did you mean bottleneck"),
        ({"block": 3}, "unknown block 3: choose one of basic, bottleneck"),
        ({"shortcut": None}, "unknown shortcut kind None: choose one of auto"),
        ({"shortcut": "projecton"}, r"\(did you mean projection\?\)"),
        ({"zero_init_residul": True}, r"no option 'zero_init_residul' \(did you mean zero_init_"),
        ({"num_classes": 2.5}, "num_classes must be an integer ≥ 0, got 2.5"),
        ({"in_chans": 0}, "in_chans must be an integer ≥ 1, got 0"),
        ({"layers": [0, 0, 0]}, r"every entry of layers must be an integer ≥ 1, got \[0, 0, 0\]"),
        ({"layers": [-1, 1, 1]}, "every entry of layers must be an integer ≥ 1"),
        ({"layers": [2.0, 2, 2]}, "every entry of layers must be an integer ≥ 1"),
        ({"layers": 3}, "layers must be a non-empty list of integers, got 3"),
        ({"layers": []}, "layers must be a non-empty list"),
        ({"widths": (0, 32, 64)}, "every entry of widths must be an integer ≥ 1"),
        ({"widths": (16, 32)}, "need one width per stage"),
        ({"stem": "imagnet"}, "unknown stem 'imagnet'"),
        ({"stem_width": 0}, "stem_width must be an integer ≥ 1, got 0"),
        ({"stem_width": -3}, "stem_width must be an integer ≥ 1, got -3"),
        ({"groups": 0}, "groups must be an integer ≥ 1, got 0"),
        ({"width_per_group": 0}, "width_per_group must be an integer ≥ 1, got 0"),
        ({"zero_init_residual": "yes"}, "zero_init_residual must be True or False"),
        ({"drop_path_rate": -0.1}, r"drop_path_rate must be a number in \[0, 1\), got -0.1"),
        ({"drop_path_rate": 1.0}, "drop_path_rate must be a number in"),
    ],
)
def test_bad_arguments_are_config_errors_that_say_what_to_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model("resnet20", **overrides)


def test_bottleneck_too_narrow_for_its_width_per_group_is_refused():
    with pytest.raises(ConfigError, match="0 channels in its 3×3: raise base_width"):
        # int(32 · 1 / 64) = 0 channels in the first stage's 3×3.
        create_model("resnet50", width_per_group=1, widths=(32, 64, 128, 256))


@pytest.mark.parametrize("name", ["ResNet-50", "resnet 50"])
def test_a_name_that_is_no_model_is_a_config_error(name):
    with pytest.raises(ConfigError, match="unknown model"):
        create_model(name)


@pytest.mark.parametrize("name", [None, 50, create_model("resnet20")])
def test_something_other_than_a_name_is_a_short_config_error(name):
    with pytest.raises(ConfigError, match=f"^a model name is a string, got {type(name).__name__}$"):
        create_model(name)  # a model passed by mistake is not printed whole


def test_stem_width_is_honoured_exactly():
    model = create_model("resnet20", stem_width=8)
    assert model.conv1.out_channels == 8 and model.layer1[0].in_channels == 8


def test_a_bug_inside_resnet_keeps_its_type_and_traceback(monkeypatch):
    def broken(self, zero_init_residual):
        raise TypeError("a genuine bug")

    monkeypatch.setattr(ResNet, "_init_weights", broken)
    with pytest.raises(TypeError, match="a genuine bug"):
        create_model("resnet20")


def test_a_spec_copies_and_pickles_but_stays_read_only():
    import copy
    import pickle

    spec = get_model_spec("resnet20")
    for clone in (copy.deepcopy(spec), pickle.loads(pickle.dumps(spec))):
        assert clone == spec and dict(clone.kwargs) == dict(spec.kwargs)
        with pytest.raises(TypeError):
            clone.kwargs["layers"] = (1, 1, 1)  # type: ignore[index]


def test_zero_init_residual_accepts_numpy_bools_and_0_or_1():
    import numpy as np

    for flag in (np.True_, 1):
        model = create_model("resnet20", zero_init_residual=flag)
        assert all(torch.count_nonzero(u.bn2.weight) == 0 for u in model.units())
    with pytest.raises(ConfigError, match="zero_init_residual"):
        create_model("resnet20", zero_init_residual=2)
