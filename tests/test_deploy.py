"""The inference path computes the same function as the trained model, only faster."""

import copy
import itertools
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import with_trained_statistics
from resunit import analysis, deploy
from resunit.blocks import BasicBlock, PadShortcut
from resunit.deploy import (
    DeployError,
    cache_pieces,
    count_multiply_adds,
    fold_batchnorm,
    fold_conv_bn,
    inference,
    measure_interleaved,
    onnx_export,
    optimize,
    relative_difference,
    throughput,
)
from resunit.deploy.module_surgery import replace_modules
from resunit.errors import ConfigError
from resunit.models import ResNet, create_model, get_model_spec, list_models, model_parameter_count

needs_onnx = pytest.mark.skipif(not deploy.onnx_available(), reason="needs the [onnx] extra")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _smallest_of_each_family() -> list[str]:
    families: dict[str, str] = {}
    for name in list_models():
        family = get_model_spec(name).family
        if family not in families or model_parameter_count(name) < model_parameter_count(
            families[family]
        ):
            families[family] = name
    return sorted(families.values())


# Every family (smallest member), plus every block type and shortcut kind that folding must
# handle: bottleneck, grouped 3×3 (ResNeXt), projection inside and outside pre-activation
# units, and ResNet-D's avg-pool shortcut.
FOLD_CASES = [(name, {}) for name in _smallest_of_each_family() if name != "preact_resnet164"] + [
    ("resnet50", {}),
    ("resnext50_32x4d", {}),
    ("resnet20", {"shortcut": "projection"}),
    ("resnet20", {"shortcut": "avgpool"}),
    ("resnet50", {"shortcut": "avgpool"}),
    ("preact_resnet164", {}),
    ("wrn_16_4", {"shortcut": "projection"}),
]


def _model(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return with_trained_statistics(create_model(name, **overrides)).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    # ImageNet models at 32×32 still pass through every stage (down to 1×1) in a fraction of
    # the time of 224×224.
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "overrides"), FOLD_CASES, ids=lambda v: str(v or ""))
def test_folded_model_matches_eval_mode_original(name, overrides):
    model = _model(name, **overrides)
    x = _input(name)
    folded = fold_batchnorm(model)
    with torch.no_grad():
        assert relative_difference(folded(x), model(x)) <= 1e-5
        # Folded in float64, the result is exact up to rounding: this catches a wrong formula
        # that float32 noise could hide.
        model64 = copy.deepcopy(model).double()
        x64 = x[:1].double()
        assert relative_difference(fold_batchnorm(model64)(x64), model64(x64)) <= 1e-12


def test_a_pre_activation_imagenet_stem_folds_its_bn_like_any_stem():
    # conv1 → bn1 → ReLU → max-pool: the stem BN follows a conv, so it folds (a warning used
    # to say it was left unfolded).
    torch.manual_seed(0)
    model = with_trained_statistics(
        ResNet("preact_bottleneck", [1, 1], widths=(8, 16), stem="imagenet")
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left N BatchNorm layer(s) unfolded"
        folded = fold_batchnorm(model)
    assert not isinstance(folded.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        assert relative_difference(folded(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "plain20"])
def test_post_activation_models_keep_no_batchnorm(name):
    folded = fold_batchnorm(_model(name))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d)), (
        "every conv absorbed a BN shift"
    )


def test_projection_shortcut_batchnorm_is_folded():
    model = _model("resnet18")
    folded = fold_batchnorm(model)
    downsample = folded.layer2[0].downsample
    assert isinstance(downsample[0], nn.Conv2d) and downsample[0].bias is not None
    assert isinstance(downsample[1], nn.Identity)
    # The shortcut alone still computes conv→BN of the original.
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        expected = model.layer2[0].downsample(x)
        assert relative_difference(downsample(x), expected) <= 1e-5


def test_preactivation_keeps_only_batchnorms_that_follow_an_addition():
    model = _model("preact_resnet110")
    folded = fold_batchnorm(model)
    kept = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # Each unit's input BN (bn1) reads the previous sum, as does final_bn: no conv to fold into.
    expected = [f"{name}.bn1" for name, _ in folded.named_units()] + ["final_bn"]
    assert kept == expected
    assert folded.folded_batchnorms == 54  # bn2 of each of the 54 units


class _TracedBasicBlock(BasicBlock):
    """A user's subclass: the same layers, so it must fold exactly like a BasicBlock."""


class _ExtraNormBlock(BasicBlock):
    """A subclass with a BN after the residual's last BN: nothing to fold that one into."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn_extra = nn.BatchNorm2d(self.out_channels)

    def residual(self, x):
        return self.bn_extra(super().residual(x))


def _subclass_model(block):
    torch.manual_seed(0)
    model = ResNet(block, [1, 1, 1], (8, 16, 32), stem="cifar", num_classes=10)
    return with_trained_statistics(model).eval()


def test_subclasses_of_the_units_are_folded():
    model = _subclass_model(_TracedBasicBlock)
    x = _input("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything folded: no warning
        folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert folded.folded_batchnorms == 1 + 3 * 2 + 2  # stem, two per unit, two projections
    with torch.no_grad():
        assert relative_difference(folded(x), model(x)) <= 1e-5


def test_batchnorms_left_unfolded_are_counted_in_a_warning():
    model = _subclass_model(_ExtraNormBlock)
    x = _input("resnet20")
    with pytest.warns(
        UserWarning, match=r"left 3 BatchNorm layer\(s\) unfolded \(layer1.0.bn_extra"
    ):
        folded = fold_batchnorm(model)
    with torch.no_grad():
        assert relative_difference(folded(x), model(x)) <= 1e-5


def test_sync_batchnorm_is_folded():
    model = _model("resnet20")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    folded = fold_batchnorm(synced)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = _input("resnet20")
    with torch.no_grad():
        assert relative_difference(folded(x), model(x)) <= 1e-5


def test_preactivation_folding_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the BNs after additions are kept by design
        fold_batchnorm(_model("preact_resnet110"))


def test_folding_leaves_the_original_untouched():
    model = _model("resnet20").train()
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert model.training and not folded.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_conv_bn_keeps_an_existing_conv_bias_and_groups():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=True)
    bn = with_trained_statistics(nn.Sequential(nn.BatchNorm2d(8)))[0].eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert relative_difference(fold_conv_bn(conv, bn)(x), bn(conv(x))) <= 1e-6


def test_fold_conv_bn_refuses_batchnorm_without_running_statistics():
    with pytest.raises(ConfigError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_optimize_matches_the_original(channels_last):
    model = _model("resnet50")
    x = _input("resnet50")
    fast = optimize(model, channels_last=channels_last)
    with torch.no_grad():
        assert relative_difference(fast(x), model(x)) <= 1e-5
    assert not torch.is_grad_enabled() or not fast(x).requires_grad


def test_optimized_channels_last_weights_are_nhwc():
    fast = optimize(_model("resnet18"), channels_last=True)
    conv = fast.model.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_model_matches_the_original():
    works, why = deploy.compile_works()
    if not works:
        pytest.skip(f"torch.compile unavailable: {why}")
    model = _model("resnet20", in_chans=1)
    x = torch.randn(3, 1, 8, 8)
    fast = optimize(model, channels_last=True, compile=True)
    with torch.no_grad():
        assert relative_difference(fast(x), model(x)) <= 1e-5
    # Freezing really happened: every conv became a oneDNN conv with its ReLU/addition fused
    # in (torch.compile's options={"freezing": True} alone silently does not do this).
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, code = run_and_get_code(fast, x)
    assert "\n".join(code).count("convolution_pointwise") >= 19


def test_relative_difference_is_relative_to_the_output_scale():
    expected = torch.tensor([100.0, 0.0])
    assert relative_difference(torch.tensor([100.0, 1e-3]), expected) == pytest.approx(1e-5)


def test_deploy_counts_multiply_adds_with_the_analysis_counter():
    # One counter (checked against a hand count in test_analysis), in float64 as in float32.
    assert deploy.count_multiply_adds is analysis.count_multiply_adds
    resnet20 = create_model("resnet20")
    assert count_multiply_adds(resnet20.double(), (3, 32, 32)) == count_multiply_adds(
        resnet20, (3, 32, 32)
    )


def test_multiply_adds_leave_the_model_as_it_was():
    model = _model("resnet20").train()
    before = copy.deepcopy(model.state_dict())
    count_multiply_adds(model, (3, 32, 32))
    assert model.training  # and BN's running statistics did not see the zero image
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- threads -----------------------------------------------------------------------------------


class _SlowRecorder(nn.Module):
    """Records, during each call, the inductor setting and how many calls overlap."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.active = self.most_active = 0
        self.freezing_seen: list[bool] = []

    def forward(self, x):
        import torch._inductor.config as inductor_config

        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.05)  # long enough for the other threads to enter and leave around it
        self.freezing_seen.append(inductor_config.freezing)
        with self.lock:
            self.active -= 1
        return x


def _in_threads(fn, n=4):
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_inference_model_keeps_its_settings_for_every_concurrent_call():
    import torch._inductor.config as inductor_config

    recorder = _SlowRecorder()
    model = deploy.InferenceModel(recorder, channels_last=False, inductor_config={"freezing": True})
    # Patched per call, the first call to finish would switch freezing off under the others.
    _in_threads(lambda i: model(torch.zeros(1, 3, 4, 4)))
    assert recorder.most_active == 1, "the first calls of one shape (compilations) take turns"
    _in_threads(lambda i: model(torch.zeros(1, 3, 4, 4)))
    assert recorder.freezing_seen == [True] * 8
    assert inductor_config.freezing is False  # restored once the last call left


def _shared_setting_on_a_dict() -> tuple[dict, inference._SharedSetting]:
    """A _SharedSetting whose 'process-wide setting' is the value in a dict, to watch it."""
    state = {"value": "original"}

    def apply(value):
        before, state["value"] = state["value"], value
        return lambda: state.update(value=before)

    return state, inference._SharedSetting(apply)


def test_a_shared_setting_is_undone_by_the_last_thread_out():
    # How a process-wide setting (oneDNN fusion; inductor's settings before torch 2.13) is
    # held: applied by the first caller in, undone by the last one out, whatever the order.
    state, setting = _shared_setting_on_a_dict()
    inside, leave = threading.Event(), threading.Event()

    def worker():
        with setting.hold("fast"):
            inside.set()
            leave.wait()

    thread = threading.Thread(target=worker)
    with setting.hold("fast"):
        thread.start()
        assert inside.wait(5)  # the same value: no waiting
    assert state["value"] == "fast"  # the first one out left it on for the worker
    leave.set()
    thread.join()
    assert state["value"] == "original"


def test_a_shared_setting_makes_other_values_wait():
    state, setting = _shared_setting_on_a_dict()
    entered = threading.Event()
    seen = []

    def other():
        with setting.hold("other"):
            seen.append(state["value"])
            entered.set()

    with setting.hold("fast"):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.2)  # "fast" is held: "other" waits for it to be undone
        with setting.hold("nested"):  # the holding thread itself never waits (no deadlock)
            assert state["value"] == "fast"
    thread.join()
    assert seen == ["other"] and state["value"] == "original"


def test_inductor_settings_are_per_thread_in_this_torch_or_shared():
    import torch._inductor.config as inductor_config

    # Whichever way this torch keeps them, a patch is visible inside and gone after.
    with inference._inductor_patch({"freezing": True}):
        assert inductor_config.freezing is True
    assert inductor_config.freezing is False
    # The probe agrees with what another thread sees of a patch.
    seen = []
    with inductor_config.patch(freezing=True):
        thread = threading.Thread(target=lambda: seen.append(inductor_config.freezing))
        thread.start()
        thread.join()
    assert inference._inductor_config_is_per_thread() == (seen == [False])


def test_measurement_interleaves_variants_and_rotates_the_order():
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = measure_interleaved(runners, batch=4, repeats=3, warmup=1)
    # Blocks of 2 calls (the first untimed), rotating which variant starts the round.
    assert "".join(calls) == "".join(c * 2 for c in "abcbcacababc")
    assert all(len(t.seconds) == 3 and t.batch == 4 for t in timings.values())


def test_measurement_times_only_the_warm_calls_of_each_block(monkeypatch):
    # A variant whose first call of every block is slow (cold caches) and the rest fast: the
    # sample is the mean of the warm calls only.
    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    state = {"calls": 0}

    def run() -> None:
        state["calls"] += 1
        clock[0] += 1.0 if state["calls"] % 4 == 1 else 0.01

    timings = measure_interleaved({"a": run}, batch=1, repeats=2, warmup=0, block=4)
    assert timings["a"].seconds == pytest.approx([0.01, 0.01])


def test_measurement_pauses_after_a_spinning_variant(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(throughput.time, "sleep", sleeps.append)
    runners = {"a": lambda: None, "spin": lambda: None}
    measure_interleaved(runners, batch=1, repeats=2, warmup=1, spinning=["spin"])
    assert len(sleeps) == 3 and min(sleeps) > 0  # once per round, after the spinning block


def _coverage_by_enumeration(n: int, k: int) -> float:
    # Each of n ratios falls below the true median with probability ½, independently; the
    # interval [k-th smallest, k-th largest] holds the median when at least k fall on each side.
    hits = 0
    for pattern in itertools.product((0, 1), repeat=n):
        below = sum(pattern)
        hits += below >= k and n - below >= k
    return hits / 2**n


@pytest.mark.parametrize(
    ("rounds", "confidence", "k"),
    [(9, 0.9, 2), (9, 0.8, 3), (15, 0.9, 4), (10, 0.9, 2), (10, 0.85, 3), (4, 0.3, 2)],
)
def test_paired_ratio_brackets_the_median_with_the_asked_coverage(rounds, confidence, k):
    rng = random.Random(rounds)
    reference = [rng.uniform(1.0, 2.0) for _ in range(rounds)]
    candidate = [rng.uniform(1.0, 2.0) for _ in range(rounds)]
    ratio = deploy.paired_ratio(reference, candidate, confidence)
    ratios = sorted(r / c for r, c in zip(reference, candidate, strict=True))
    assert ratio.median == statistics.median(ratios) and ratio.rounds == rounds
    assert (ratio.low, ratio.high) == (ratios[k - 1], ratios[rounds - k])
    assert ratio.confidence == pytest.approx(_coverage_by_enumeration(rounds, k))
    # k is the narrowest rank that still covers enough: one step narrower would not.
    assert ratio.confidence >= confidence > _coverage_by_enumeration(rounds, k + 1)


def test_paired_ratio_cancels_what_a_round_shares_and_covers_the_true_ratio():
    # The machine's phase (shared by both variants in a round) varies 3x; the candidate is
    # truly 1.25x faster, with 5% noise of its own each call.
    rng = random.Random(0)
    trials, covered, widths = 1000, 0, []
    for _ in range(trials):
        phases = [rng.uniform(1.0, 3.0) for _ in range(9)]
        reference = [p * 1.25 * rng.lognormvariate(0, 0.05) for p in phases]
        candidate = [p * rng.lognormvariate(0, 0.05) for p in phases]
        ratio = deploy.paired_ratio(reference, candidate)
        covered += ratio.low <= 1.25 <= ratio.high
        widths.append(ratio.high - ratio.low)
    assert covered / trials >= 0.93  # exact coverage 96.1% for 9 rounds at rank 2
    assert statistics.median(widths) < 0.2  # the phases, up to 3x, cancel


def test_paired_ratio_with_too_few_rounds_says_how_sure_it_is():
    ratio = deploy.paired_ratio([2.0, 3.0, 4.0], [1.0, 1.0, 1.0], confidence=0.9)
    assert (ratio.low, ratio.median, ratio.high) == (2.0, 3.0, 4.0)
    assert ratio.confidence == pytest.approx(0.75)  # all three: 1 - 2/8
    assert "75% interval 2.00-4.00" in ratio.describe()
    # One or two rounds: the interval is all there is, and says how little that is.
    one = deploy.paired_ratio([2.0], [1.0])
    assert (one.low, one.median, one.high, one.confidence) == (2.0, 2.0, 2.0, 0.0)
    two = deploy.paired_ratio([2.0, 4.0], [1.0, 1.0])
    assert (two.low, two.median, two.high, two.confidence) == (2.0, 3.0, 4.0, 0.5)
    with pytest.raises(ConfigError, match="same number of rounds"):
        deploy.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="confidence"):
        deploy.paired_ratio([1.0], [1.0], confidence=1.0)


@pytest.mark.parametrize(("policy", "spins"), [(None, True), ("PASSIVE", False), ("active", True)])
def test_pytorch_variants_count_as_spinning_unless_openmp_threads_sleep(monkeypatch, policy, spins):
    # GNU OpenMP's threads busy-wait after each parallel region unless told to sleep: the
    # measurement must pause after a PyTorch variant as after ONNX Runtime's spinning one.
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    assert deploy.openmp_threads_spin() is spins
    variants, _ = deploy.build_variants(_model("resnet20"), (3, 32, 32), ["eager", "folded"])
    assert all(v.spinning is spins for v in variants.values())


def test_compare_variants_reports_each_output_difference():
    model = _model("resnet20")
    x = _input("resnet20")
    variants, _ = deploy.build_variants(model, (3, 32, 32), ["eager", "folded"])
    with torch.no_grad():
        reference = model(x)
    timings, differences = deploy.compare_variants(variants, x, reference, repeats=1)
    assert set(timings) == set(differences) == {"eager", "folded"}
    assert differences["eager"] == 0.0 and 0 < differences["folded"] <= 1e-5


@needs_onnx
def test_onnx_runtime_variants_share_one_file_per_build_and_each_build_its_own():
    # Both thread settings of one build run the same file (equal outputs, one spinning);
    # a second build of another model never runs the first one's file.
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    calibration = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    names = ["onnxruntime", "onnxruntime_spin", "int8", "int8_spin"]
    for classes in (10, 3):
        model = _model("resnet20", num_classes=classes)
        variants, skipped = deploy.build_variants(
            model, (3, 16, 16), names, calibration_batches=calibration
        )
        assert skipped == {}
        out = {name: variants[name].run(x) for name in names}
        assert [variants[n].spinning for n in names] == [False, True, False, True]
        assert torch.equal(out["onnxruntime"], out["onnxruntime_spin"])
        assert torch.equal(out["int8"], out["int8_spin"])
        with torch.no_grad():
            reference = model(x)
        assert out["onnxruntime"].shape == (2, classes)
        assert relative_difference(out["onnxruntime"], reference) <= 1e-5
        assert relative_difference(out["int8"], reference) <= 0.1  # int8, not another model
        del variants


_FAULTS_PER_ALLOCATION = """
import json, resource, sys, torch
from resunit import deploy
retained = sys.argv[1] == "retain" and deploy.retain_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MiB: glibc maps it afresh every time by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": [faults() for _ in range(20)]}))
"""


@pytest.mark.parametrize("mode", ["default", "retain"])
def test_retain_freed_memory_stops_page_faults_on_reuse(mode):
    # In a fresh process, as a server calls it at start-up (the heap of this test process has
    # been shaped by every test before it).
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_ALLOCATION, mode],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    steady = result["faults"][-10:]  # glibc settles the heap's size in the first rounds
    pages = 64 * 2**20 // resource.getpagesize()
    if mode == "default":
        assert min(steady) > pages // 2  # every round faults the whole block in again
    elif not result["retained"]:
        pytest.skip("not glibc")
    else:
        # Reused: most rounds fault nothing. (Now and then the block lands at a new place at
        # the top of the heap once, and its pages are touched for the first time there.)
        assert sorted(steady)[len(steady) // 2] < 100 and sum(steady) < 2 * pages


def test_unknown_compiler_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown compiler"):
        optimize(_model("resnet20"), compile="tvm")


needs_onednn_graph = pytest.mark.skipif(
    not deploy.onednn_graph_works()[0],
    reason=f"oneDNN Graph unavailable: {deploy.onednn_graph_works()[1]}",
)


def test_replace_modules_swaps_every_one_of_a_kind_and_says_where_it_was():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.ReLU(), nn.Tanh()))
    parents = []

    def make(old: nn.Module, parent: nn.Module) -> nn.Module:
        parents.append(parent)
        return nn.Sequential(nn.ReLU())  # holds a ReLU itself: must not be visited again

    assert replace_modules(model, nn.ReLU, make) is model
    assert parents == [model, model[2]]
    assert [type(m).__name__ for m in model.modules()].count("ReLU") == 2  # the new ones only
    assert isinstance(model[1], nn.Sequential) and isinstance(model[2][0], nn.Sequential)
    # A model that is itself of the kind is replaced whole.
    relu = nn.ReLU()
    assert isinstance(replace_modules(relu, nn.ReLU, lambda old, parent: nn.Tanh()), nn.Tanh)


@pytest.mark.parametrize("size", [8, 7])  # odd sizes: ceil(H/2) rows from both
def test_pad_shortcuts_become_convolutions_that_compute_them_bitwise(size):
    g = torch.Generator().manual_seed(5)
    for pad in (PadShortcut(16, 32, 2), PadShortcut(8, 8, 2), PadShortcut(4, 12, 1)):
        conv = deploy.pad_shortcuts_as_convolutions(pad)  # the root itself may be one
        assert isinstance(conv, nn.Conv2d)
        x = torch.randn(2, pad.in_channels, size, size, generator=g)
        with torch.no_grad():
            # Only ones and zeros multiply: bitwise the same as slice + pad (finite inputs).
            assert torch.equal(conv(x), pad(x))


@pytest.mark.parametrize(
    ("name", "overrides", "dtype"),
    [
        ("resnet20", {}, torch.float32),
        ("resnet20", {}, torch.float64),  # the convolution takes its unit's dtype
        ("resnet50", {"shortcut": "pad"}, torch.float32),  # bottleneck units
        ("preact_resnet110", {"shortcut": "pad"}, torch.float32),  # pre-activation
    ],
)
def test_models_with_pad_shortcuts_compute_the_same_after_the_rewrite(name, overrides, dtype):
    model = _model(name, **overrides).to(dtype)
    converted = deploy.pad_shortcuts_as_convolutions(model)
    assert any(isinstance(m, PadShortcut) for m in model.modules()), "the original is kept"
    assert not any(isinstance(m, PadShortcut) for m in converted.modules())
    x = _input(name).to(dtype)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


@needs_onednn_graph
@pytest.mark.parametrize(
    "name, channels_last",
    [(name, True) for name in ("resnet20", "resnet18", "resnext50_32x4d", "preact_resnet164")]
    + [(name, False) for name in ("resnet20", "wrn_16_4")],
)
def test_onednn_graph_matches_the_original(name, channels_last):
    model = _model(name)
    x = _input(name)
    fast = optimize(model, channels_last=channels_last, compile="onednn_graph")
    with torch.no_grad():
        expected = model(x)
        assert relative_difference(fast(x), expected) <= 1e-5  # first call: already fused
        assert relative_difference(fast(x), expected) <= 1e-5
        # Another batch size gets a graph of its own.
        assert relative_difference(fast(x[:1]), model(x[:1])) <= 1e-5
    assert len(fast.graphs) == 2


@needs_onednn_graph
def test_onednn_graph_converts_the_input_layout_before_its_trace():
    # channels_last: NCHW and NHWC inputs share one NHWC trace (PyTorch converts faster than
    # oneDNN Graph's own reorder would), and both compute the original function.
    model = _model("resnet20")
    x = _input("resnet20")[:1]
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    nhwc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        assert relative_difference(fast(x), expected) <= 1e-5
        assert relative_difference(fast(nhwc), expected) <= 1e-5
    assert [key[1] for key in fast.graphs] == [nhwc.stride()]
    # Called with grad on, it still records no autograd graph.
    assert not fast(x).requires_grad and not fast(x.requires_grad_()).requires_grad


@needs_onednn_graph
def test_onednn_graph_traces_once_when_first_called_from_several_threads(monkeypatch):
    model = _model("resnet20")
    x = _input("resnet20")
    fast = optimize(model, channels_last=False, compile="onednn_graph")
    traces = []
    trace = inference._trace_and_freeze
    monkeypatch.setattr(
        inference, "_trace_and_freeze", lambda m, e: traces.append(m) or trace(m, e)
    )
    outputs = _in_threads(lambda i: fast(x))
    assert len(traces) == 1
    with torch.no_grad():
        expected = model(x)
    assert all(relative_difference(out, expected) <= 1e-5 for out in outputs)
    assert not torch._C._jit_llga_enabled()


@needs_onednn_graph
def test_onednn_graph_fuses_the_convolutions():
    fast = optimize(_model("resnet20"), channels_last=False, compile="onednn_graph")
    fast(_input("resnet20"))
    graph = str(torch.jit.last_executed_optimized_graph())
    assert graph.count("prim::oneDNNFusionGroup") >= 10
    assert not torch._C._jit_llga_enabled()  # the process-wide switch is restored


@needs_onednn_graph
def test_onednn_graph_switches_fusion_on_only_to_trace_a_new_shape(monkeypatch):
    model = _model("resnet20")
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    holds = []
    hold = inference._ONEDNN_FUSION.hold
    monkeypatch.setattr(inference._ONEDNN_FUSION, "hold", lambda v: holds.append(v) or hold(v))
    x = _input("resnet20")
    fast(x)
    assert holds == [True]
    fast(x)  # warm: runs its fused plan without touching the process-wide switch
    assert holds == [True]
    assert str(torch.jit.last_executed_optimized_graph()).count("prim::oneDNNFusionGroup") >= 10
    with torch.no_grad():
        assert relative_difference(fast(x), model(x)) <= 1e-5


@needs_onednn_graph
def test_onednn_graph_traces_a_bounded_number_of_shapes_and_runs_later_ones_eagerly(monkeypatch):
    monkeypatch.setattr(inference, "MAX_ONEDNN_GRAPHS", 2)
    model = _model("resnet20")
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    x = _input("resnet20", batch=3)
    with pytest.warns(
        UserWarning, match="built 2 graphs for input shapes and thread counts"
    ) as caught:
        for size in (1, 2, 3, 1, 3):
            out = fast(x[:size])  # outside no_grad: the model runs without autograd anyway
            assert not out.requires_grad
            with torch.no_grad():
                assert relative_difference(out, model(x[:size])) <= 1e-5
    assert len(caught) == 1  # once, not on every call
    assert caught[0].filename == __file__  # points at the caller's line
    assert [key[0][0] for key in fast.graphs] == [1, 2]


def test_unit_working_set_counts_a_units_input_and_every_convolution_output_per_image():
    # ResNet-50 at 64×64: stage 1 runs at 16×16. Its first bottleneck reads a 64-channel input
    # and writes conv1 (64), conv2 (64), conv3 (256) and the projection (256): 704 maps.
    model = create_model("resnet50").eval()
    per_image = 704 * 16 * 16 * 4
    assert cache_pieces.unit_working_set(model, torch.randn(1, 3, 64, 64)) == per_image
    assert cache_pieces.unit_working_set(model, torch.randn(3, 3, 64, 64)) == per_image
    # ResNet-20 at 32×32: a stage-1 unit reads 16 channels and writes two 16-channel maps.
    assert (
        cache_pieces.unit_working_set(_model("resnet20"), _input("resnet20", 1))
        == 3 * 16 * 32**2 * 4
    )
    assert cache_pieces.unit_working_set(nn.Sequential(nn.Conv2d(3, 8, 3)), _input("resnet20")) == 0


def test_cache_sized_batch_is_the_cache_over_a_units_bytes_per_image(monkeypatch):
    model, x = _model("resnet20"), _input("resnet20", 1)
    per_image = cache_pieces.unit_working_set(model, x)
    for cache, expected in ((10 * per_image, 10), (int(2.6 * per_image), 3), (per_image // 3, 1)):
        monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda cache=cache: cache)
        assert cache_pieces.cache_sized_batch(model, x) == expected
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: None)
    assert cache_pieces.cache_sized_batch(model, x) is None  # unknown cache: never split
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: 10 * per_image)
    # Not a CPU tensor: no CPU cache to fit (and the model is not run on it).
    assert cache_pieces.cache_sized_batch(model, torch.empty(1, 3, 32, 32, device="meta")) is None


def test_last_level_cache_size_is_read_from_sysfs(tmp_path):
    def cache_dir(index: int, level: str, size: str) -> None:
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")

    read = cache_pieces.last_level_cache_bytes.__wrapped__  # not the cached answer for this machine
    assert read(tmp_path) is None
    cache_dir(0, "1", "48K")
    cache_dir(2, "2", "1024K")
    assert read(tmp_path) is None  # no level 3
    cache_dir(3, "3", "32768K")
    assert read(tmp_path) == 32 * 2**20
    (tmp_path / "index3" / "size").write_text("96M")
    assert read(tmp_path) == 96 * 2**20
    for unreadable in ("", "lots"):  # skipped, not an error in every call of the model
        (tmp_path / "index3" / "size").write_text(unreadable)
        assert read(tmp_path) is None


@needs_onednn_graph
def test_onednn_graph_runs_a_batch_that_overflows_the_cache_in_even_pieces(monkeypatch):
    model, x = _model("resnet20"), _input("resnet20", batch=10)
    per_image = cache_pieces.unit_working_set(model, x[:1])
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: 3 * per_image)
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    with torch.no_grad():
        expected = model(x)
        # 10 images are under 4 caches' worth (4 × 3): one piece, one trace.
        assert relative_difference(fast(x), expected) <= 1e-5
        assert [key[0][0] for key in fast.graphs] == [10]
        # 12 are not: pieces of 3, each traced once, outputs in order.
        big = torch.cat([x, x[:2]])
        assert relative_difference(fast(big), torch.cat([expected, expected[:2]])) <= 1e-5
        assert [key[0][0] for key in fast.graphs] == [10, 3]
        # 13 make five pieces as even as can be: 3, 3, 3, 2, 2 — two shapes, not a remainder.
        odd = torch.cat([x, x[:3]])
        assert relative_difference(fast(odd), torch.cat([expected, expected[:3]])) <= 1e-5
        assert [key[0][0] for key in fast.graphs] == [10, 3, 2]
        fast.split_large_batches = False
        assert relative_difference(fast(big), torch.cat([expected, expected[:2]])) <= 1e-5
        assert [key[0][0] for key in fast.graphs] == [10, 3, 2, 12]


@needs_onednn_graph
def test_onednn_graph_neither_measures_nor_waits_once_no_trace_place_is_left(monkeypatch):
    # Measuring hooks the model, and other threads run it eagerly once every place is taken;
    # such calls must not wait on the process-wide first-call lock either.
    monkeypatch.setattr(inference, "MAX_ONEDNN_GRAPHS", 1)
    model, x = _model("resnet20"), _input("resnet20", batch=12)
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: 1)  # pieces of 1
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    with torch.no_grad():
        fast(x[:1])
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # as another model's long first call would
        with inference._FIRST_CALL_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(10)
    outputs = []
    try:
        with pytest.warns(UserWarning, match="built 1 graphs for input shapes"):
            caller = threading.Thread(target=lambda: outputs.append(fast(x)))
            caller.start()
            caller.join(20)
            assert not caller.is_alive()  # ran while the lock was held
    finally:
        release.set()
        holder.join()
    with torch.no_grad():
        assert relative_difference(outputs[0], model(x)) <= 1e-5
    assert fast.piece_sizes == {} and [key[0][0] for key in fast.graphs] == [1]


@needs_onednn_graph
def test_onednn_graph_warning_points_at_the_caller_when_pieces_run_eagerly(monkeypatch):
    monkeypatch.setattr(inference, "MAX_ONEDNN_GRAPHS", 1)
    model, x = _model("resnet20"), _input("resnet20", batch=13)
    per_image = cache_pieces.unit_working_set(model, x[:1])
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: 3 * per_image)
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    with pytest.warns(UserWarning, match="built 1 graphs for input shapes") as caught:
        out = fast(x)  # pieces 3, 3, 3, 2, 2: the 3 takes the place, the 2s run eagerly
    assert caught[0].filename == __file__
    with torch.no_grad():
        assert relative_difference(out, model(x)) <= 1e-5
    assert [key[0][0] for key in fast.graphs] == [3]


@needs_onednn_graph
def test_onednn_graph_traces_again_for_another_thread_count():
    # oneDNN Graph compiles for the trace's thread count and keeps it: a graph traced on one
    # thread ran at one thread's speed when called on two (measured; see OneDnnGraphModel).
    model = _model("resnet20")
    fast = optimize(model, channels_last=True, compile="onednn_graph")
    x = _input("resnet20")
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            with torch.no_grad():
                assert relative_difference(fast(x), model(x)) <= 1e-5
    finally:
        torch.set_num_threads(threads)
    assert [key[-1] for key in fast.graphs] == [1, 2]  # the third call reused the first


@needs_onednn_graph
def test_onednn_graph_leaves_a_training_mode_model_s_statistics_alone():
    model = _model("resnet20").train()
    before = copy.deepcopy(model.state_dict())
    fast = deploy.OneDnnGraphModel(model, channels_last=False)
    fast(_input("resnet20"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110", "wrn_16_4"])
def test_head_as_convolution_is_the_pool_and_classifier(name):
    model = _model(name).double()
    x = torch.randn(2, 3, 20, 24, dtype=torch.float64)  # a 5×6 last map (3×3 for the WRN)
    state = torch.get_rng_state()
    rewritten = inference._head_as_convolution(model, x, channels_last=False)
    assert torch.equal(torch.get_rng_state(), state)  # no random initialisation of the conv
    assert isinstance(rewritten, inference._HeadAsConvolution)
    assert rewritten.conv.weight.is_contiguous()  # the layout asked for, NCHW here…
    channels_last = inference._head_as_convolution(model, x, channels_last=True).conv.weight
    assert channels_last.is_contiguous(memory_format=torch.channels_last)  # …and NHWC here
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), rtol=1e-12, atol=1e-12)


class _OwnHead(ResNet):
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return super().forward_head(x, pre_logits) * 2


class _HalvedPool(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2


class _ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 10


def test_head_stays_a_pool_where_a_convolution_would_not_be_the_same_or_not_pay(monkeypatch):
    x = _input("resnet20")

    def unchanged(model: nn.Module) -> bool:
        return inference._head_as_convolution(model, x, channels_last=False) is model

    assert unchanged(create_model("resnet20", num_classes=0).eval())
    assert unchanged(_OwnHead(**get_model_spec("resnet20").kwargs).eval())
    scaled = _model("resnet20")
    scaled.fc = _ScaledLinear(64, 10)
    assert unchanged(scaled)
    own_pool = _model("resnet20")
    own_pool.avgpool = _HalvedPool(1)
    assert unchanged(own_pool)
    for where in ("fc", "avgpool", None):  # a hook on the classifier, the pool, the model
        hooked = _model("resnet20")
        (getattr(hooked, where) if where else hooked).register_forward_hook(
            lambda module, inputs, output: output * 2
        )
        assert unchanged(hooked)
    pre_hooked = _model("resnet20")
    pre_hooked.fc.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 2,))
    assert unchanged(pre_hooked)
    with nn.modules.module.register_module_forward_hook(lambda m, i, o: o):
        assert unchanged(_model("resnet20"))  # process-wide hooks see every module
    model = _model("resnet20")  # 64 × 10 classifier, 8×8 map: 40,960 multiply-adds
    monkeypatch.setattr(inference, "_MAX_HEAD_CONVOLUTION_MACS", 40_959)
    assert unchanged(model)
    monkeypatch.setattr(inference, "_MAX_HEAD_CONVOLUTION_MACS", 40_960)
    assert not unchanged(model)


@needs_onednn_graph
def test_onednn_graph_runs_the_pool_inside_a_fused_partition():
    fast = optimize(_model("resnet20"), channels_last=True, compile="onednn_graph")
    fast(_input("resnet20"))
    graph = torch.jit.last_executed_optimized_graph()
    outside_partitions = {node.kind() for node in graph.nodes()}
    assert "prim::oneDNNFusionGuard" in outside_partitions
    assert not outside_partitions & {"aten::adaptive_avg_pool2d", "aten::mean", "aten::linear"}


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown variant"):
        deploy.build_variants(create_model("resnet20"), (3, 8, 8), ["eager", "turbo"])


# --- ONNX ------------------------------------------------------------------------------------


@needs_onnx
@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110"])
def test_onnx_export_matches_pytorch_for_any_batch(tmp_path, name):
    model = _model(name, in_chans=1)
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), dynamic_batch=True)
    check = deploy.verify_onnx(path, model, (1, 8, 8), batch_sizes=(1, 5))
    assert check.passed and check.max_relative_difference <= 1e-4


@needs_onnx
def test_a_float64_model_exports_as_float32_and_verifies_in_float64(tmp_path):
    import onnx

    model = _model("resnet20").double()
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), dynamic_batch=True)
    weights = onnx.load(str(path)).graph.initializer
    assert {t.data_type for t in weights if len(t.dims) > 1} == {onnx.TensorProto.FLOAT}
    check = deploy.verify_onnx(path, model, (3, 8, 8), batch_sizes=(1, 2))
    assert check.passed
    assert next(model.parameters()).dtype == torch.float64  # the model itself is unchanged


@needs_onnx
def test_a_meta_model_cannot_be_exported(tmp_path):
    with torch.device("meta"):
        model = create_model("resnet20")
    with pytest.raises(DeployError, match="meta device"):
        deploy.export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))


@needs_onnx
def test_exported_graph_has_no_batchnorm(tmp_path):
    import onnx

    path = deploy.export_onnx(_model("resnet20"), tmp_path / "m.onnx", (3, 8, 8))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


@needs_onnx
def test_verification_fails_when_the_export_computes_something_else(tmp_path):
    model = _model("resnet20")
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))
    other = _model("resnet20")
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(DeployError, match="differs from PyTorch"):
        deploy.verify_onnx(path, other, (3, 8, 8), batch_sizes=(1,))


@needs_onnx
def test_static_export_rejects_another_batch_size(tmp_path):
    model = _model("resnet20")
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), dynamic_batch=False)
    with pytest.raises(DeployError, match="batch of 2"):
        deploy.verify_onnx(path, model, (3, 8, 8), batch_sizes=(2,))


@needs_onnx
def test_a_fixed_batch_export_verifies_by_default_and_runs_any_batch_in_pieces(tmp_path):
    model = _model("resnet20", in_chans=1)
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))  # batch fixed to 1
    check = deploy.verify_onnx(path, model, (1, 8, 8))  # the defaults of both agree
    assert check.batch_sizes == [1] and check.passed
    runner = deploy.OnnxRuntimeModel(path)
    assert runner.batch_size == 1
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_difference(runner(x), model(x)) <= 1e-4  # five calls, stacked
    dynamic = deploy.OnnxRuntimeModel(
        deploy.export_onnx(model, tmp_path / "d.onnx", (1, 8, 8), dynamic_batch=True)
    )
    assert dynamic.batch_size is None
    assert deploy.verify_onnx(dynamic.path, model, (1, 8, 8)).batch_sizes == [1, 2]


@needs_onnx
def test_a_file_fixed_to_batch_four_runs_any_batch_in_padded_pieces(tmp_path):
    model = _model("resnet20", in_chans=1)
    path = tmp_path / "b4.onnx"
    # Another tool's export, fixed to batch 4 (ours fixes batch 1); its warnings silenced.
    with torch.no_grad(), onnx_export._quiet_exporter():
        torch.onnx.export(model, (torch.randn(4, 1, 8, 8),), str(path), dynamo=False)
    runner = deploy.OnnxRuntimeModel(path)
    assert runner.batch_size == 4
    g = torch.Generator().manual_seed(6)
    for batch in (1, 3, 4, 5, 9):  # short, exact, and over with a short last piece
        x = torch.randn(batch, 1, 8, 8, generator=g)
        with torch.no_grad():
            out = runner(x)
            assert out.shape == (batch, 10)
            assert relative_difference(out, model(x)) <= 1e-4
    with pytest.raises(ConfigError, match="takes N×C×H×W batches, got a tensor of 1×8×8"):
        runner(torch.randn(1, 8, 8))


@needs_onnx
def test_an_export_that_fails_halfway_leaves_no_file(tmp_path, monkeypatch):
    model = _model("resnet20", in_chans=1)
    path = tmp_path / "m.onnx"

    def export_then_fail(module, args, f, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", export_then_fail)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        deploy.export_onnx(model, path, (1, 8, 8))
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one


@needs_onnx
def test_onnx_mistakes_are_one_line_errors(tmp_path):
    model = _model("resnet20", in_chans=1)
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        deploy.export_onnx(model, tmp_path / "folder.onnx", (1, 8, 8))
    with pytest.raises(ConfigError, match=r"C×H×W \(3 numbers, without the batch\), got 1×1×8×8"):
        deploy.export_onnx(model, tmp_path / "m.onnx", (1, 1, 8, 8))
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(DeployError, match="no ONNX file at"):
        deploy.OnnxRuntimeModel(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_text("not a model")
    with pytest.raises(DeployError, match="ONNX Runtime cannot load"):
        deploy.verify_onnx(tmp_path / "garbage.onnx", model, (1, 8, 8))
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))
    with pytest.raises(ConfigError, match="takes 1-channel images"):
        deploy.verify_onnx(path, model, (3, 8, 8))
    with pytest.raises(ConfigError, match="not one tensor"):
        deploy.quantize(model, torch.randn(4, 1, 8, 8))
    with pytest.raises(ConfigError, match="the ONNX file first"):
        deploy.verify_onnx(model, path, (1, 8, 8))  # arguments in export_onnx's order
    with pytest.raises(ConfigError, match="the model first"):
        deploy.export_onnx(path, model, (1, 8, 8))


@needs_onnx
def test_int8_model_is_quantized_and_close_to_float(tmp_path):
    import onnx

    model = _model("resnet20", in_chans=1)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(4)]
    int8 = deploy.quantize(model, batches, tmp_path / "q.onnx")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 19  # every conv of ResNet-20 (the classifier may stay float)
    x = torch.randn(8, 1, 8, 8, generator=g)
    with torch.no_grad():
        # 8-bit activations through 19 layers: a few percent of the output scale, not 1e-4.
        assert relative_difference(int8(x), model(x)) <= 0.1
    assert not (tmp_path / ".q.tmp").exists(), "intermediate files are cleaned up"


@needs_onnx
def test_quantize_needs_calibration_batches():
    with pytest.raises(ConfigError, match="calibration"):
        deploy.quantize(_model("resnet20"), [])


@pytest.mark.skipif(not deploy.pt2e_available(), reason="needs torchao (the [int8] extra)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pt2e_int8_model_is_close_to_float_for_any_batch(dtype):
    model = _model("resnet20", in_chans=1)
    g = torch.Generator().manual_seed(3)
    # Calibration batches of different sizes: the captured graph keeps the batch dynamic.
    batches = [torch.randn(n, 1, 8, 8, generator=g) for n in (16, 8)]
    # A float64 model is quantized from a float32 copy and left as it is.
    given = copy.deepcopy(model).to(dtype)
    int8 = deploy.quantize_pt2e(given, [b.to(dtype) for b in batches])
    assert next(given.parameters()).dtype == dtype
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        assert relative_difference(int8(x), model(x)) <= 0.1


@needs_onnx
def test_verify_onnx_never_passes_non_finite_outputs(tmp_path):
    model = _model("resnet20")
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (3, 32, 32))
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))  # PyTorch's output is NaN, ONNX Runtime's is not
    with pytest.raises(DeployError, match="the model itself outputs NaN or infinity"):
        deploy.verify_onnx(path, model, (3, 32, 32), batch_sizes=(1,))
    # The other way round: a file whose output is NaN never matches a finite model.
    broken = _model("resnet20")
    with torch.no_grad():
        broken.fc.weight.fill_(float("nan"))
    nan_file = deploy.export_onnx(broken, tmp_path / "nan.onnx", (3, 32, 32))
    with pytest.raises(DeployError, match="not trustworthy"):
        deploy.verify_onnx(nan_file, _model("resnet20"), (3, 32, 32), batch_sizes=(1,))
