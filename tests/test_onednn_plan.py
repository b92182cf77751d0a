"""The oneDNN plan (``optimize(compile="onednn_plan")``): the same function, fused, from C."""

import copy
import importlib.metadata
import shutil
import threading

import pytest
import torch
from torch import nn

from helpers import with_trained_statistics
from resunit import deploy
from resunit.blocks import DropPath
from resunit.deploy import OneDnnPlan, native_build, onednn_plan, optimize, relative_difference
from resunit.errors import ConfigError
from resunit.models import create_model

WORKS, WHY = deploy.onednn_plan_works()
needs_plan = pytest.mark.skipif(not WORKS, reason=f"oneDNN plans unavailable: {WHY}")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _trained_like(model: nn.Module) -> nn.Module:
    return with_trained_statistics(model).eval()


def _float64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The original model in float64: an independent check of both float32 paths.
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


# Every block type and shortcut the registry builds: basic, bottleneck, grouped (ResNeXt),
# pre-activation (BatchNorm that no convolution precedes), plain (no shortcut), wide with
# dropout (gone in eval mode), option-A padding (as convolutions), ResNet-D's average pool,
# the ImageNet stem's max pool.
PLAN_CASES = [
    ("resnet20", {}),
    ("plain20", {}),
    ("preact_resnet110", {}),
    ("wrn_16_4", {"dropout": 0.3}),
    ("resnet18", {}),
    ("resnet50", {"shortcut": "avgpool"}),
    ("resnext50_32x4d", {}),
]


@needs_plan
@pytest.mark.parametrize(("name", "overrides"), PLAN_CASES, ids=lambda v: str(v or ""))
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_plan_computes_the_original_function(name, overrides, channels_last):
    torch.manual_seed(0)
    model = _trained_like(create_model(name, num_classes=10, **overrides))
    # 33×33: odd sizes reach ceil_mode and padding edge cases in every stage.
    x = torch.randn(3, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    fast = optimize(model, channels_last=channels_last, compile="onednn_plan")
    expected = _float64_reference(model, x)
    with torch.no_grad():
        eager_error = relative_difference(model(x).double(), expected)
    # As close to the float64 result as eager float32 is, within rounding in another order:
    # 110 layers of random weights take eager float32 itself to ~6e-6 for some seeds.
    tolerance = max(1e-5, 3 * eager_error)
    assert relative_difference(fast(x).double(), expected) <= tolerance
    assert relative_difference(fast(x[:1]).double(), expected[:1]) <= tolerance  # own plan
    assert len(fast.graphs) == 2
    assert not fast(x).requires_grad


@needs_plan
def test_a_residual_network_runs_as_its_convolutions_with_nothing_between():
    # Every ReLU and every residual sum fused into a convolution: the plan holds one step per
    # convolution, plus the pool and the classifier.
    model = optimize(_trained_like(create_model("resnet20")), compile="onednn_plan").model
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    graph = onednn_plan._Graph(model, torch.randn(1, 3, 32, 32))
    steps = graph.fuse()
    assert [s.kind for s in steps].count("conv") == convolutions
    assert len(steps) == convolutions + 2
    sums = [s for s in steps if s.accumulate_into is not None]
    assert len(sums) == 9  # one per residual unit
    assert all(s.relu for s in sums)


class _Reads:
    """Small graphs whose additions cannot all be done in place."""

    class ShortcutReadAgain(nn.Module):
        # x is read after the convolution that could add into it: it must stay intact.
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            y = torch.relu(self.conv(x) + x)
            return y + x

    class InputAsAddend(nn.Module):
        # The caller's tensor is never written: this sum needs its own buffer.
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    class ReluBeforeAndAfter(nn.Module):
        # An addition of two ReLUs, a ReLU read twice, a flatten of a pooled map, DropPath.
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2)
            self.relu = nn.ReLU()
            self.drop = DropPath(0.2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            a = self.relu(self.conv(x))
            b = self.drop(torch.relu(a + a))
            return self.fc(torch.flatten(self.pool(b + a), 1))


class _InPlace:
    """In-place layers: every later reader of their input sees their result, as in eager."""

    class AddInPlaceThenReadTheName(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out.add_(torch.relu(x))  # the result of add_ is unused: `out` is read below
            return torch.relu(out)

    class ReluInPlaceOnAnAlias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.same = nn.Identity()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            a = self.conv(x)
            b = self.same(a)  # the same tensor under another name
            r = self.relu(a)
            return r + b  # eager: 2 × relu(a)

    class FunctionalReluInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            a = self.conv(x)
            torch.relu_(a)
            b = nn.functional.relu(a, inplace=True)
            return a + b


class _Broadcast(nn.Module):
    """A sum with a pooled (n, c, 1, 1) addend: oneDNN broadcasts it, never adds into it."""

    def __init__(self, pooled_first: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pooled_first = pooled_first

    def forward(self, x):
        a = self.conv(x)
        p = self.pool(a)
        return p + self.conv2(a) if self.pooled_first else self.conv2(a) + p


@needs_plan
@pytest.mark.parametrize(
    "make",
    [
        _Reads.ShortcutReadAgain,
        _Reads.InputAsAddend,
        _Reads.ReluBeforeAndAfter,
        _InPlace.AddInPlaceThenReadTheName,
        _InPlace.ReluInPlaceOnAnAlias,
        _InPlace.FunctionalReluInPlace,
        lambda: _Broadcast(pooled_first=False),
        lambda: _Broadcast(pooled_first=True),
        lambda: nn.Identity(),  # the output is the input: copied, not left unwritten
        lambda: nn.Sequential(nn.Dropout(), nn.Identity()),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ],
)
def test_graphs_that_cannot_all_be_fused_in_place_still_compute_the_model(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 9, 9)
    plan = OneDnnPlan(model, x)
    kept = x.clone()
    with torch.no_grad():
        expected = copy.deepcopy(model)(x.clone())  # a copy: in-place layers write their input
    assert relative_difference(plan(x), expected) <= 1e-5
    assert relative_difference(plan(x), expected) <= 1e-5  # the second call alike
    assert torch.equal(x, kept)  # and the caller's tensor untouched


@needs_plan
def test_a_model_ending_in_a_feature_map_returns_it_in_plain_layout():
    # oneDNN keeps maps in blocked layouts inside; the caller gets PyTorch's NCHW.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(2, 3, 8, 8)
    out = OneDnnPlan(model, x)(x)
    assert out.shape == (2, 32, 4, 4) and out.is_contiguous()
    with torch.no_grad():
        assert relative_difference(out, model(x)) <= 1e-6


@needs_plan
@pytest.mark.parametrize(
    ("pool", "size"),
    [
        (nn.MaxPool2d(3, 2, 1, ceil_mode=True), 8),
        (nn.MaxPool2d(2, 2, ceil_mode=True), 7),
        (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), 8),
        (nn.AvgPool2d(2, 2), 9),
    ],
)
def test_pooling_windows_match_pytorch_including_ceil_mode(pool, size):
    model = nn.Sequential(nn.Conv2d(3, 16, 1), pool).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    out = OneDnnPlan(model, x)(x)
    with torch.no_grad():
        expected = model(x)
    assert out.shape == expected.shape
    assert relative_difference(out, expected) <= 1e-6


class _DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # Python control flow on a tensor: fx cannot follow


def test_layers_a_plan_cannot_run_are_refused_when_the_model_is_wrapped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid())
    with pytest.raises(ConfigError, match=r"cannot run Sigmoid.*compile='onednn_graph'"):
        onednn_plan.check_plan_supported(model)
    with pytest.raises(ConfigError, match="count_include_pad=False"):
        onednn_plan.check_plan_supported(nn.Sequential(nn.AvgPool2d(3, padding=1)))
    with pytest.raises(ConfigError, match="1×1 only"):
        onednn_plan.check_plan_supported(nn.Sequential(nn.AdaptiveAvgPool2d(2)))
    with pytest.raises(ConfigError, match="cannot run Flatten"):  # keeps a dimension
        onednn_plan.check_plan_supported(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1, 2)))
    with pytest.raises(ConfigError, match=r"torch\.fx cannot trace"):
        onednn_plan.check_plan_supported(_DataDependent())
    if WORKS:  # optimize refuses before any input arrives
        with pytest.raises(ConfigError, match="Sigmoid"):
            optimize(model, compile="onednn_plan")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        # PyTorch applies Linear to the last dimension; a plan only to flattened rows.
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(8, 8)), r"Linear to \(n, features\) rows"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "cannot run Flatten"),  # a 6×6 map
    ],
)
@needs_plan
def test_layers_that_depend_on_shapes_are_refused_when_the_input_arrives(model, message):
    x = torch.randn(1, 3, 8, 8)
    onednn_plan.check_plan_supported(model)  # the kinds of layer are fine
    with pytest.raises(ConfigError, match=message):
        OneDnnPlan(model.eval(), x)


@needs_plan
def test_a_plan_refuses_inputs_it_was_not_built_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    plan = OneDnnPlan(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"built for inputs of shape \(1, 3, 8, 8\)"):
        plan(torch.randn(2, 3, 8, 8))
    # The C side reads float32 from host memory: other tensors are refused, never reinterpreted.
    for dtype in (torch.float64, torch.float16, torch.int32):
        with pytest.raises(ValueError, match=f"float32 CPU tensors, not 4-d {dtype}"):
            plan(torch.zeros(1, 3, 8, 8, dtype=dtype))
    with pytest.raises(ValueError, match="float32"):
        OneDnnPlan(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))


@needs_plan
def test_a_model_in_training_mode_is_refused_and_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"eval mode"):
        OneDnnPlan(model, torch.randn(2, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched


@needs_plan
def test_threads_calling_one_plan_at_once_each_get_their_own_answer():
    # One set of buffers per plan: concurrent calls must take turns, not mix their tensors.
    model = _trained_like(create_model("resnet20"))
    fast = optimize(model, compile="onednn_plan")
    inputs = [
        torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    fast(inputs[0])  # built before the threads start
    results: list = [None] * 4
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = [fast(inputs[i]) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, outs in zip(inputs, results, strict=True):
        expected = _float64_reference(model, x)
        assert all(relative_difference(out.double(), expected) <= 1e-5 for out in outs)
    assert len(fast.graphs) == 1


@needs_plan
def test_each_thread_count_gets_its_own_plan():
    model = _trained_like(create_model("resnet20"))
    fast = optimize(model, compile="onednn_plan")
    x = torch.randn(1, 3, 32, 32)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(fast(x))
    finally:
        torch.set_num_threads(before)
    assert sorted(key[-1] for key in fast.graphs) == [1, 2]
    expected = _float64_reference(model, x)
    assert all(relative_difference(out.double(), expected) <= 1e-5 for out in outputs)


def test_a_missing_onednn_package_names_the_extra(monkeypatch):
    def missing(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ConfigError, match=r"resunit\[onednn\]"):
        native_build._installed_file("onednn-cpu-gomp", "libdnnl.so.3")


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_a_failed_build_names_the_error_and_leaves_no_library_behind(tmp_path, monkeypatch):
    source = tmp_path / "broken.cpp"
    # An error inside a function: the compiler's first line is context, not the error.
    source.write_text("int f() {\n  return undeclared_name;\n}\n")
    monkeypatch.setattr(native_build, "SOURCE", source)
    target = tmp_path / "cache" / "plan.so"
    with pytest.raises(ConfigError, match=r"failed: .*error: .*undeclared_name"):
        native_build._build([shutil.which("c++")], tmp_path, tmp_path, target)
    assert list(target.parent.iterdir()) == []  # neither the library nor a partial file


@pytest.fixture
def fresh_library_load():
    """Forget the loaded library for one test, and again after it (the next load is real)."""
    native_build._load_once.cache_clear()
    yield
    native_build._load_once.cache_clear()


def test_a_failed_build_is_remembered_and_refused_by_optimize(
    tmp_path, monkeypatch, fresh_library_load
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(native_build, "_compiler", lambda: ["c++"])
    monkeypatch.setattr(native_build, "_version", lambda compiler: "c++ 1.0")
    builds = []

    def failing_build(*args):
        builds.append(args)
        raise ConfigError("building the oneDNN plan library failed: no compiler today")

    monkeypatch.setattr(native_build, "_build", failing_build)
    if not _onednn_installed():
        pytest.skip("the [onednn] extra is not installed: the build is never reached")
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    for _ in range(3):  # refused when wrapped, not on the first call, and compiled only once
        with pytest.raises(ConfigError, match="no compiler today"):
            optimize(model, compile="onednn_plan")
    assert len(builds) == 1


def _onednn_installed() -> bool:
    try:
        return all(importlib.metadata.files(p) for p in native_build.ONEDNN_PACKAGES)
    except importlib.metadata.PackageNotFoundError:
        return False


class _ReadAfterAugmentedAddition(nn.Module):
    # fx records `h += r` as an ordinary addition, so its graph reads the old h through
    # `kept`; eager PyTorch changed that tensor in place. Only the model itself can tell.
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        kept = h
        h += self.conv(h)
        return torch.relu(kept)


@needs_plan
def test_a_plan_that_computes_another_function_than_its_model_is_refused():
    torch.manual_seed(0)
    model = _ReadAfterAugmentedAddition().eval()
    with pytest.raises(ConfigError, match="computes another function than the model"):
        OneDnnPlan(model, torch.randn(1, 3, 8, 8))


@needs_plan
def test_forward_hooks_are_refused_rather_than_skipped():
    model = _trained_like(create_model("resnet20", shortcut="projection"))
    x = torch.randn(1, 3, 32, 32)
    handle = model.fc.register_forward_hook(lambda module, args, out: out * 0.5)
    with pytest.raises(ConfigError, match="forward hooks on fc"):
        OneDnnPlan(model, x)
    handle.remove()
    handle = model.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(ConfigError, match="the model's forward hooks"):
        OneDnnPlan(model, x)
    handle.remove()
    OneDnnPlan(model, x)  # without hooks it builds


@needs_plan
def test_building_leaves_the_caller_s_input_alone_even_for_in_place_layers():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    kept = x.clone()
    out = OneDnnPlan(model, x)(x)
    assert torch.equal(x, kept)
    with torch.no_grad():
        assert relative_difference(out, model(x.clone())) <= 1e-6


@needs_plan
def test_the_output_is_float32_whatever_the_default_dtype(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    plan = OneDnnPlan(model, x)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = plan(x)
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert relative_difference(out, model(x)) <= 1e-6


@needs_plan
def test_a_deep_copy_builds_its_own_plans_and_computes_the_same():
    # Deploy steps deep-copy the models they are given; a plan's C pointers cannot be copied.
    model = _trained_like(create_model("resnet20"))
    fast = optimize(model, compile="onednn_plan")
    x = torch.randn(1, 3, 32, 32)
    first = fast(x)
    clone = copy.deepcopy(fast)
    assert clone.graphs == {} and len(fast.graphs) == 1
    assert torch.equal(clone(x), first)
    assert clone.model is not fast.model


def test_bench_skips_the_variant_with_its_reason_where_plans_cannot_be_built(monkeypatch):
    monkeypatch.setattr(
        native_build, "_load_once", lambda: ConfigError("oneDNN is not installed: test")
    )
    variants, skipped = deploy.build_variants(
        nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), ["folded", "onednn_plan"]
    )
    assert list(variants) == ["folded"]
    assert "oneDNN is not installed: test" in skipped["onednn_plan"]


@needs_plan
def test_a_batch_that_overflows_the_cache_runs_as_plans_for_even_pieces(monkeypatch):
    from resunit.deploy import cache_pieces

    model = _trained_like(create_model("resnet20"))
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    per_image = cache_pieces.unit_working_set(model, x[:1])
    monkeypatch.setattr(cache_pieces, "last_level_cache_bytes", lambda: 3 * per_image)
    fast = optimize(model, compile="onednn_plan")
    out = fast(x)  # 12 images are over 4 caches' worth (4 × 3): pieces of 3
    assert [key[0][0] for key in fast.graphs] == [3]
    assert relative_difference(out.double(), _float64_reference(model, x)) <= 1e-5


@needs_plan
@pytest.mark.parametrize(
    ("overrides", "shape"),
    [({"in_chans": 1}, (2, 1, 28, 28)), ({"num_classes": 0}, (2, 3, 32, 32))],
    ids=["one-channel input", "features, no classifier"],
)
def test_other_inputs_and_heads_compute_the_model(overrides, shape):
    torch.manual_seed(0)
    model = _trained_like(create_model("resnet20", **overrides))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    out = optimize(model, compile="onednn_plan")(x)
    expected = _float64_reference(model, x)
    assert out.shape == expected.shape
    assert relative_difference(out.double(), expected) <= 1e-5
