"""The training library: schedule, optimiser, sharding, evaluation and a short real run."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from resunit import deploy
from resunit.checkpoint import load_model, read_checkpoint
from resunit.data import load_dataset
from resunit.errors import ConfigError, DatasetError, TrainingError
from resunit.evaluation import evaluate, prepare_batch, top1_agreement
from resunit.models import create_model
from resunit.train import (
    RECIPES,
    TrainConfig,
    learning_rate,
    load_run_data,
    make_config,
    make_optimizer,
    read_metrics,
    shard_indices,
    train,
    weights_digest,
)

# --- the data a checkpoint was trained on -------------------------------------------------


def test_a_run_s_data_root_goes_with_its_own_dataset_only(tmp_path):
    # A CIFAR run evaluated on another dataset: its recorded root is CIFAR's, not the other's.
    config = {"data": "cifar10", "data_root": str(tmp_path), "num_classes": 10, "in_chans": 3,
              "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
    synthetic = load_run_data(config, "test", "synthetic")
    assert (synthetic.num_classes, synthetic.in_chans) == (10, 3)
    with pytest.raises(DatasetError, match=tmp_path.name):  # its own: the recorded root is used
        load_run_data(config, "test")


# --- schedule and optimiser ---------------------------------------------------------------


def test_he2015_recipe_divides_lr_at_32k_and_48k_and_stops_at_64k():
    config = make_config("he2015")
    assert (config.batch_size, config.lr, config.weight_decay, config.momentum) == (
        128,
        0.1,
        1e-4,
        0.9,
    )
    assert (config.crop_padding, config.flip, config.steps) == (4, True, 64_000)
    assert config.data == "cifar10"
    lr = [learning_rate(config, s, 64_000, 352) for s in (0, 31_999, 32_000, 47_999, 48_000)]
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_explicit_options_win_over_the_recipe():
    config = make_config("he2015", lr=0.05, data="cifar100")
    assert config.lr == 0.05 and config.data == "cifar100" and config.batch_size == 128
    assert make_config().recipe == "fast" and make_config().flip is False  # never flip digits


def test_an_explicit_epoch_count_beats_the_recipes_step_count():
    # he2015 counts 64k steps; `--epochs 1` must mean one epoch, not hours of training.
    assert make_config(data="cifar10").steps == 64_000
    one_epoch = make_config(data="cifar10", epochs=1)
    assert one_epoch.steps is None and one_epoch.epochs == 1
    assert make_config(data="cifar10", epochs=1, steps=10).steps == 10  # both given: steps


def test_warmup_cosine_and_onecycle_shapes():
    c = TrainConfig(lr=1.0, schedule="cosine", warmup_epochs=1)
    lrs = [learning_rate(c, s, 100, 10) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 1e-3
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    expected_mid = 0.5 * (1 + math.cos(math.pi * 45 / 90))
    assert lrs[55] == pytest.approx(expected_mid)
    o = TrainConfig(lr=1.0, schedule="onecycle")
    one = [learning_rate(o, s, 100, 10) for s in range(100)]
    assert max(one) == pytest.approx(1.0) and one.index(max(one)) == 30
    assert one[0] < 0.1 and one[-1] < 1e-3


def test_weight_decay_spares_batchnorm_and_biases():
    model = create_model("resnet20", num_classes=10, in_chans=1)
    optimizer = make_optimizer(model, TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.5))
    before = {k: v.clone() for k, v in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no loss gradient: only weight decay can move anything
    optimizer.step()
    for name, p in model.named_parameters():
        if p.ndim > 1:  # conv and linear weights shrink by lr × wd = 5%
            torch.testing.assert_close(p, before[name] * 0.95)
        else:  # BN scale/shift and the fc bias stay put
            assert torch.equal(p, before[name]), name


def test_invalid_options_are_config_errors():
    for bad in (dict(lr=-1), dict(epochs=0), dict(schedule="step"), dict(milestones=[40])):
        with pytest.raises(ConfigError):
            make_config(**bad)
    with pytest.raises(ConfigError, match="recipe"):
        make_config("imagenet")


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("epochs", 1.5, "an integer"),  # would train one epoch, then fail inside range()
        ("epochs", "1", "an integer"),
        ("batch_size", True, "an integer"),
        ("lr", "0.1", "a number"),
        ("flip", 1, "true or false"),
        ("milestones", [0.5, "x"], "a list of numbers"),
        ("threads", 2.0, "an integer or None"),
    ],
)
def test_options_of_the_wrong_type_are_refused_before_any_training(tmp_path, option, value, words):
    with pytest.raises(ConfigError, match=f"{option} must be {words}"):
        make_config(**{option: value})
    config = replace(make_config(out=str(tmp_path / "run")), **{option: value})
    with pytest.raises(ConfigError, match=f"{option} must be {words}"):
        train(config, progress=False)  # a TrainConfig built without make_config
    assert not (tmp_path / "run").exists(), "nothing written"


def test_train_without_a_config_or_a_run_to_resume_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a TrainConfig"):
        train(None, progress=False)


def test_numpy_scalars_and_paths_are_options_like_python_ones(tmp_path):
    import numpy as np

    config = make_config(
        epochs=np.int64(2), lr=np.float32(0.5), flip=np.True_, milestones=(np.float64(0.5),),
        out=tmp_path / "run",
    )  # fmt: skip
    assert (config.epochs, config.flip, config.milestones, config.out) == (
        2, True, [0.5], str(tmp_path / "run"),
    )  # fmt: skip
    assert type(config.epochs) is int and type(config.lr) is float
    direct = TrainConfig(epochs=np.int64(3), milestones=[np.float64(0.5)], out=tmp_path / "d")
    saved = json.loads(json.dumps(direct.to_dict()))  # config.json is writable
    assert (saved["epochs"], saved["out"]) == (3, str(tmp_path / "d"))


# --- distributed sharding -----------------------------------------------------------------


def test_shards_are_disjoint_equal_and_reshuffled_every_epoch():
    n, world = 103, 4
    epochs = []
    for epoch in range(2):
        shards = [
            shard_indices(n, torch.Generator().manual_seed(epoch), r, world) for r in range(world)
        ]
        flat = torch.cat(shards)
        assert len(set(flat.tolist())) == len(flat) == n - n % world
        assert {len(s) for s in shards} == {n // world}
        epochs.append(shards[0])
    assert not torch.equal(epochs[0], epochs[1])


# --- evaluation ---------------------------------------------------------------------------


def test_evaluate_agrees_with_scikit_learn_confusion_matrix():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    test = load_dataset("digits", "test")
    result = evaluate(model, test, batch_size=64)  # several batches, last one partial
    with torch.no_grad():
        predicted = model(prepare_batch(test.images, test.mean, test.std)).argmax(1)
    reference = confusion_matrix(test.labels.numpy(), predicted.numpy(), labels=range(10))
    assert result["confusion_matrix"] == reference.tolist()
    assert result["accuracy"] == pytest.approx((predicted == test.labels).double().mean().item())
    per_class = reference.diagonal() / reference.sum(1)
    assert result["per_class_accuracy"] == pytest.approx(per_class.tolist())


@pytest.mark.parametrize(
    ("data", "data_root", "env", "expected"),
    [
        ("imagefolder", "pics", None, "pics"),  # as given, made absolute
        ("cifar10", None, None, "data"),  # CIFAR's default
        ("cifar10", None, "sets", "sets"),  # ... or $RESUNIT_DATA
        ("digits", None, None, None),  # bundled: no root at all
    ],
)
def test_the_recorded_data_root_is_absolute_so_any_directory_finds_it(
    tmp_path, monkeypatch, data, data_root, env, expected
):
    from resunit.train import _recorded_data_root

    monkeypatch.chdir(tmp_path)
    if env:
        monkeypatch.setenv("RESUNIT_DATA", env)
    else:
        monkeypatch.delenv("RESUNIT_DATA", raising=False)
    config = TrainConfig(data=data, data_root=data_root)
    assert _recorded_data_root(config) == (str(tmp_path / expected) if expected else None)


def test_evaluate_gives_each_images_pick_and_top1_agreement_counts_the_same_picks():
    test = load_dataset("digits", "test")
    torch.manual_seed(0)
    # Random linear maps of the pixels: their picks vary from image to image (an untrained
    # ResNet tends to pick one class for every image).
    first = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    second = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        x = prepare_batch(test.images, test.mean, test.std)
        first_picks, second_picks = first(x).argmax(1), second(x).argmax(1)
    same = (first_picks == second_picks).double().mean().item()
    assert 0 < same < 1  # two random networks: some agreement, not all
    # In dataset order, across batches with a partial last one (360 = 5 × 64 + 40).
    a = evaluate(first, test, batch_size=64, predictions=True)
    b = evaluate(second, test, batch_size=64, predictions=True)
    assert a["predictions"] == first_picks.tolist() and b["predictions"] == second_picks.tolist()
    assert a["accuracy"] == pytest.approx((first_picks == test.labels).double().mean().item())
    assert "predictions" not in evaluate(first, test)  # only when asked: summaries stay small
    assert top1_agreement(a["predictions"], b["predictions"]) == pytest.approx(same)
    assert top1_agreement(a["predictions"], a["predictions"]) == 1.0
    # The accuracy gap is bounded by the disagreement.
    assert abs(a["accuracy"] - b["accuracy"]) <= 1 - same + 1e-12
    with pytest.raises(ValueError, match="predictions for 360 and 359 images"):
        top1_agreement(a["predictions"], b["predictions"][:-1])


def test_a_class_with_no_test_images_has_no_accuracy_rather_than_zero():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    test = load_dataset("digits", "test")
    without_nines = test.subset(torch.nonzero(test.labels != 9).flatten())
    result = evaluate(model, without_nines, batch_size=64)
    assert result["per_class_accuracy"][9] is None
    assert all(a is not None for a in result["per_class_accuracy"][:9])
    assert result["count"] == int((test.labels != 9).sum())


def _digits_sample(count: int = 40):
    test = load_dataset("digits", "test")
    return test.subset(torch.arange(count))


def test_evaluating_a_model_with_another_number_of_classes_is_a_config_error():
    model = create_model("resnet20", num_classes=7, in_chans=1).train()
    with pytest.raises(ConfigError, match=r"7 outputs per image but digits has 10 classes"):
        evaluate(model, _digits_sample())
    assert model.training  # the caller's mode survives the failure


def test_evaluate_restores_the_callers_mode_and_checks_the_batch_size():
    model = create_model("resnet20", num_classes=10, in_chans=1)
    data = _digits_sample()
    for training in (True, False):
        model.train(training)
        evaluate(model, data, batch_size=16)
        assert model.training is training
    for bad in (0, "64", 16.0):
        with pytest.raises(ConfigError, match=f"batch size must be an integer ≥ 1, got {bad!r}"):
            evaluate(model, data, batch_size=bad)


@pytest.mark.skipif(not deploy.onnx_available(), reason="needs the [onnx] extra")
def test_evaluate_accepts_an_onnx_runtime_model(tmp_path):
    # It has no parameters to say where batches go: evaluation runs them on the CPU.
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    path = deploy.export_onnx(model, tmp_path / "m.onnx", (1, 8, 8), dynamic_batch=True)
    runner = deploy.OnnxRuntimeModel(path, threads=1)
    assert list(runner.parameters()) == []
    data = _digits_sample()
    onnx_result = evaluate(runner, data, batch_size=16)
    torch_result = evaluate(model, data, batch_size=16)
    assert onnx_result["count"] == torch_result["count"] == 40
    assert onnx_result["confusion_matrix"] == torch_result["confusion_matrix"]
    assert onnx_result["loss"] == pytest.approx(torch_result["loss"], rel=1e-4)


def test_prepare_batch_resizes_to_the_model_input_size():
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    x = prepare_batch(images, (0.5,), (0.25,), input_size=16, channels_last=True)
    assert x.shape == (2, 1, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)


# --- a real (short) run on digits ---------------------------------------------------------


def _quick(tmp_path, name="run", **kw):
    options = dict(epochs=2, batch_size=32, threads=1, out=str(tmp_path / name))
    options.update(kw)
    return make_config(**options)


def test_training_on_digits_learns_and_writes_the_run_directory(tmp_path):
    config = _quick(tmp_path, epochs=3, val_fraction=0.1)
    summary = train(config, progress=False)
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"} <= {
        p.name for p in run.iterdir()
    }
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["test_accuracy"] > 0.8  # 3 short epochs; the full default reaches ≥ 99%
    # config.json holds everything needed to reproduce the run.
    saved = json.loads((run / "config.json").read_text())
    # (input_size is saved resolved: the size the model was trained at, here the native 8×8.)
    assert TrainConfig(**{k: saved[k] for k in config.to_dict()}) == replace(config, input_size=8)
    assert saved["classes"] == [str(i) for i in range(10)] and saved["in_chans"] == 1
    # best.pt is chosen on validation accuracy, never on the test set.
    best_epoch = max(metrics, key=lambda m: m["val_accuracy"])["epoch"]
    assert read_checkpoint(run / "best.pt")["epoch"] == best_epoch == summary["best_epoch"]
    model, _ = load_model(run / "last.pt")
    assert weights_digest(model) == summary["weights_sha256"]
    test = load_dataset("digits", "test")
    assert evaluate(model, test)["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_without_a_validation_split_best_pt_holds_the_final_weights(tmp_path):
    # A learning rate too small to learn: training accuracy then wanders, so the last epoch
    # is not the one with the best training accuracy, which used to pick best.pt.
    summary = train(_quick(tmp_path, epochs=3, lr=1e-6), progress=False)
    accuracy = [m["train_accuracy"] for m in read_metrics(tmp_path / "run")]
    assert accuracy[-1] < max(accuracy)  # the case this test is about
    best, last = (
        read_checkpoint(tmp_path / "run" / "best.pt"),
        read_checkpoint(tmp_path / "run" / "last.pt"),
    )
    assert best["epoch"] == last["epoch"] == summary["best_epoch"] == 3
    assert summary["best_val_accuracy"] is None
    for key, tensor in last["model"].items():
        assert torch.equal(best["model"][key], tensor), key


def test_same_seed_same_weights_on_cpu(tmp_path):
    a = train(_quick(tmp_path, "a", epochs=1), progress=False)
    b = train(_quick(tmp_path, "b", epochs=1), progress=False)
    c = train(_quick(tmp_path, "c", epochs=1, seed=1), progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]


def test_compiled_training_follows_the_eager_run_and_saves_plain_weights(tmp_path):
    from resunit.deploy import compile_works

    works, why = compile_works()
    if not works:
        pytest.skip(f"torch.compile unavailable: {why}")
    # Same seed and data: the compiled step computes the same maths in another order, so after
    # a few steps the weights differ by rounding only (over a whole epoch the early, unstable
    # phase of training amplifies those differences), and the checkpoint holds the plain keys.
    few_steps = dict(
        epochs=1,
        data="synthetic",
        data_options=dict(num_samples=96, image_size=8, channels=3, num_classes=10),
    )
    train(_quick(tmp_path, "eager", **few_steps), progress=False)
    train(_quick(tmp_path, "compiled", compile=True, **few_steps), progress=False)
    a, _ = load_model(tmp_path / "eager" / "last.pt")
    b, _ = load_model(tmp_path / "compiled" / "last.pt")
    assert a.state_dict().keys() == b.state_dict().keys()
    torch.manual_seed(0)
    initial = create_model("resnet20", num_classes=10).state_dict()  # where train() starts
    moved = (a.state_dict()["conv1.weight"] - initial["conv1.weight"]).abs().max()
    assert moved > 1e-3  # the steps changed the weights, so agreeing below means something
    for key, value in a.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-4, atol=1e-4)


def test_tensorboard_logs_every_metric_of_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_quick(tmp_path, epochs=2, val_fraction=0.1, tensorboard=True), progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for record in read_metrics(tmp_path / "run"):
        for key in ("train_loss", "val_accuracy", "lr"):
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[record["epoch"]] == pytest.approx(record[key], rel=1e-6)


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(_quick(tmp_path, epochs=1, tensorboard=True), progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-made that would block a rerun


def test_in_process_resume_from_an_epoch_boundary_is_bitwise_identical(tmp_path):
    kw = dict(epochs=2, crop_padding=1, cutout=2, schedule="constant")
    full = train(_quick(tmp_path, "full", **kw), progress=False)
    # A run stopped after epoch 1 (44 steps); with a constant lr nothing else depends on the
    # total length, so its checkpoint is the one "full" wrote after epoch 1.
    partial = _quick(tmp_path, "part", **kw, steps=44)
    train(partial, progress=False)
    state = read_checkpoint(tmp_path / "part" / "last.pt")
    state["config"]["steps"] = None  # the same run as "full", stopped after its first epoch
    torch.save(state, tmp_path / "part" / "last.pt")
    resumed = train(None, progress=False, resume=tmp_path / "part")  # its saved options
    assert resumed["weights_sha256"] == full["weights_sha256"]
    metrics = read_metrics(tmp_path / "part")
    assert [m["epoch"] for m in metrics] == [1, 2]
    # The summary's training time counts the epoch trained before the resume too.
    assert resumed["training_seconds"] == pytest.approx(sum(m["seconds"] for m in metrics))
    assert resumed["training_seconds"] > metrics[-1]["seconds"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr × 1e12 at half-way: epoch 1 trains normally, epoch 2 blows up.
    config = _quick(tmp_path, epochs=2, lr=0.05, gamma=1e12, milestones=[0.5])
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step (\d+) \(epoch 2\)"):
        train(config, progress=False)
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_train_restores_the_callers_thread_count(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        config = make_config(steps=2, out=str(tmp_path / "run"))  # digits: the recipe's 1 thread
        assert config.threads == 1
        train(config, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_train_restores_the_thread_count_when_it_fails_and_zero_keeps_it(tmp_path, monkeypatch):
    import resunit.train

    seen = []

    def failing_load_data(config):
        seen.append(torch.get_num_threads())
        raise DatasetError("simulated failure after the thread count was set")

    monkeypatch.setattr(resunit.train, "load_data", failing_load_data)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threads in (1, 0):  # 0 overrides the recipe's 1: torch's own setting stays
            config = make_config(threads=threads, out=str(tmp_path / f"run{threads}"))
            assert config.threads == threads
            with pytest.raises(DatasetError, match="simulated"):
                train(config, progress=False)
            assert torch.get_num_threads() == 2
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads must be"):
        make_config(threads=-1)


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_recipe_sets_every_value_it_names(name):
    config = make_config(name)
    assert config.recipe == name
    for option, value in RECIPES[name].items():
        assert getattr(config, option) == value, option


def test_run_directory_is_never_overwritten(tmp_path):
    train(_quick(tmp_path, epochs=1, steps=2), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(_quick(tmp_path, epochs=1, steps=2), progress=False)


def test_he2015_recipe_runs_on_cifar_files_with_a_validation_split(tmp_path):
    from test_data import _write_cifar10_python

    _write_cifar10_python(tmp_path / "cifar-10-batches-py", per_batch=8)
    config = make_config(
        "he2015",
        data_root=str(tmp_path),
        steps=3,
        batch_size=8,
        threads=1,
        out=str(tmp_path / "run"),
    )
    summary = train(config, progress=False)
    assert summary["steps"] == 3 and summary["best_val_accuracy"] is not None
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["mean"] == [0.4914, 0.4822, 0.4465] and saved["val_fraction"] == 0.1
    assert saved["classes"][0] == "airplane" and saved["in_chans"] == 3


def test_imagefolder_run_evaluates_and_predicts_at_its_training_size(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from resunit.cli import main

    rng = np.random.default_rng(0)
    # Shapes, not brightness (batch norm would remove a pure brightness difference).
    for split in ("train", "test"):
        for cls in ("horizontal", "vertical"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = rng.integers(0, 60, (20, 14, 3))
                if cls == "horizontal":
                    pixels[::4] += 180
                else:
                    pixels[:, ::4] += 180
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    root = str(tmp_path / "images")
    args = [
        "train",
        "--data",
        "imagefolder",
        "--data-root",
        root,
        "--data-option",
        "image_size=12",
        "--epochs",
        "10",
        "--batch-size",
        "6",
        "--threads",
        "1",
        "--out",
        str(run),
        "--no-progress",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 12 and result["classes"] == ["horizontal", "vertical"]
    assert result["accuracy"] == 1.0, result
    big = tmp_path / "big.png"  # a larger grayscale picture of vertical stripes
    stripes = np.zeros((60, 42), np.uint8)
    stripes[:, ::12] = stripes[:, 1::12] = stripes[:, 2::12] = 230
    Image.fromarray(stripes, "L").save(big)
    assert main(["predict", "--checkpoint", str(run / "last.pt"), str(big), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["classes"][0] == "vertical"


def _flag_worker(
    rank: int, store_file: str, values: list[float], interrupts: list[bool], results
) -> None:
    import torch.distributed as dist

    from resunit.distributed import Distributed, agree_on_step, stop_requested

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        info = Distributed(rank=rank, world_size=2, local_rank=rank)
        cpu = torch.device("cpu")
        agreed = agree_on_step(values[rank], interrupts[rank], info, cpu)
        results[rank] = (*agreed, stop_requested(interrupts[rank], info, cpu))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("values", "interrupts", "expected"),
    [
        ([1.0, 2.0], [False, False], (True, False, False)),
        ([1.0, math.nan], [False, True], (False, True, True)),
        ([math.inf, 2.0], [False, False], (False, False, False)),
        ([1.0, 2.0], [True, False], (True, True, True)),
    ],
)
def test_every_rank_stops_when_one_rank_diverges_or_sees_ctrl_c(
    tmp_path, values, interrupts, expected
):
    # A rank that stopped alone would leave the others waiting in DDP's next all-reduce.
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_flag_worker, args=(str(tmp_path / "store"), values, interrupts, results), nprocs=2)
    assert dict(results) == {0: expected, 1: expected}


class _Reduced(Exception):
    """Stops a faked all_reduce: a meta tensor has no value to read back."""


def test_per_step_collectives_use_tensors_on_the_training_device(monkeypatch):
    # NCCL (the backend on CUDA) reduces CUDA tensors only, and this machine may have no GPU:
    # the meta device stands in for "not the CPU", and the fake all_reduce records where each
    # flag lives before any value is needed.
    from resunit.distributed import Distributed, agree_on_step, stop_requested

    devices = []

    def fake_all_reduce(tensor, op=None, **kwargs):
        devices.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    two_ranks = Distributed(rank=0, world_size=2)
    meta = torch.device("meta")
    with pytest.raises(_Reduced):
        agree_on_step(1.0, False, two_ranks, meta)
    with pytest.raises(_Reduced):
        stop_requested(False, two_ranks, meta)
    assert devices == [meta, meta]
    # Alone, no collective is called at all.
    assert agree_on_step(1.0, False, Distributed(), meta) == (True, False)
    assert agree_on_step(math.nan, True, Distributed(), meta) == (False, True)
    assert stop_requested(False, Distributed(), meta) is False
    assert len(devices) == 2
