"""``resunit train / eval / predict / data download`` end to end, including crashes and torchrun.

Runs that must survive a signal run in a subprocess (``python -m resunit``), exactly as users
run them; the rest call the CLI's ``main`` in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resunit.checkpoint import load_model, read_checkpoint
from resunit.cli import main
from resunit.data import load_dataset
from resunit.train import read_metrics, weights_digest

# Small and quick, but long enough (45 steps per epoch) to be killed in the middle of one.
QUICK = ["--epochs", "3", "--batch-size", "32", "--threads", "1", "--no-progress"]


def resunit(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "resunit", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def digest_of(checkpoint: Path) -> str:
    model, _ = load_model(checkpoint)
    return weights_digest(model)


def wait_for_epochs(run_dir: Path, count: int, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # curves.png is drawn right after epoch 1's line: then the next epoch is under way.
        if len(read_metrics(run_dir)) >= count and (run_dir / "curves.png").exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.communicate()}")
        time.sleep(0.02)
    pytest.fail("training did not progress")


def wait_into_epoch_2(run_dir: Path, proc: subprocess.Popen) -> None:
    """Return about 40% into epoch 2. Epoch 1's own time sets the wait: a fixed one (it was
    0.3 s) is most of an epoch on a fast machine (0.35 s here), and then epoch 2 may be over."""
    wait_for_epochs(run_dir, 1, proc)
    time.sleep(0.4 * read_metrics(run_dir)[0]["seconds"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every interrupted-and-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = resunit("train", *QUICK, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "test accuracy" in stdout
    return out


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = resunit("train", *QUICK, "--out", str(out))
    wait_into_epoch_2(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_checkpoint(out / "last.pt")["epoch"] >= 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = resunit("train", "--resume", str(out), "--no-progress")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert digest_of(out / "last.pt") == digest_of(reference_run / "last.pt")
    # One metrics line per epoch, none duplicated by the replayed epoch.
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert [m["train_loss"] for m in read_metrics(out)] == [
        m["train_loss"] for m in read_metrics(reference_run)
    ]


def test_ctrl_c_saves_a_mid_epoch_checkpoint_that_resumes_exactly(tmp_path, reference_run):
    out = tmp_path / "run"
    proc = resunit("train", *QUICK, "--out", str(out))
    wait_into_epoch_2(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"--resume {out}" in stdout
    state = read_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and 0 < state["epoch_step"] < 45  # stopped inside epoch 2
    resumed = resunit("train", "--resume", str(out), "--no-progress")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert digest_of(out / "last.pt") == digest_of(reference_run / "last.pt")


def test_eval_prints_accuracy_per_class_and_confusion_matrix(reference_run, capsys, tmp_path):
    png = tmp_path / "cm.png"
    assert main(["eval", "--checkpoint", str(reference_run / "best.pt"), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "confusion matrix" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", "--checkpoint", str(reference_run / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 360 and matrix.shape == (10, 10)
    assert result["accuracy"] == pytest.approx(np.trace(matrix) / 360)
    summary = json.loads((reference_run / "summary.json").read_text())
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_predict_reads_images_of_any_size_and_mode(reference_run, tmp_path, capsys):
    from resunit.data import load_dataset

    test = load_dataset("digits", "test")
    digit = test.images[0, 0].numpy()
    big = Image.fromarray(digit).resize((64, 64), Image.NEAREST)
    big.save(tmp_path / "gray.png")
    big.convert("P").save(tmp_path / "palette.gif")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[..., :3] = np.asarray(big.resize((40, 40)))[..., None]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    files = [str(tmp_path / n) for n in ("gray.png", "palette.gif", "rgba.png")]
    checkpoint = str(reference_run / "best.pt")
    assert main(["predict", "--checkpoint", checkpoint, *files, "--top-k", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == files
    for r in results:
        assert len(r["classes"]) == 3 and r["probabilities"] == sorted(r["probabilities"])[::-1]
        assert 0 < sum(r["probabilities"]) <= 1 + 1e-6
    # The same picture in three modes gets the same answer, the label of the digit.
    assert {r["classes"][0] for r in results} == {str(int(test.labels[0]))}


def test_predict_invert_reads_dark_ink_on_white_as_the_model_learnt_it(
    reference_run, tmp_path, capsys
):
    from resunit.data import load_dataset

    test = load_dataset("digits", "test")
    digit = test.images[0, 0].numpy()
    Image.fromarray(digit).save(tmp_path / "as_learnt.png")
    Image.fromarray(255 - digit).save(tmp_path / "on_paper.png")  # dark ink, white ground
    checkpoint = str(reference_run / "best.pt")
    runs = {}
    for name, extra in [("as_learnt", []), ("on_paper", ["--invert"])]:
        argv = ["predict", "--checkpoint", checkpoint, str(tmp_path / f"{name}.png"), *extra]
        assert main([*argv, "--top-k", "10", "--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out)[0]
    # Inverting the inverted picture gives back the original: the same answer, the same numbers.
    assert runs["on_paper"]["classes"] == runs["as_learnt"]["classes"]
    assert runs["on_paper"]["probabilities"] == pytest.approx(runs["as_learnt"]["probabilities"])
    assert runs["as_learnt"]["classes"][0] == str(int(test.labels[0]))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_user_errors_are_one_line_and_exit_code_2(tmp_path, capsys, reference_run):
    assert main(["train", "--data", "cifar10", "--data-root", str(tmp_path)]) == 2
    err = _error_line(capsys)
    # It names both places it looked (ROOT/cifar10 and ROOT) and how to fill one.
    assert f"not found in {tmp_path / 'cifar10'} or {tmp_path}:" in err
    assert "resunit data download cifar10" in err
    assert main(["train", "--lr", "-1"]) == 2
    assert "lr" in _error_line(capsys)
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["train", "--resume", str(reference_run), "--lr", "0.5"]) == 2
    assert "drop --lr" in _error_line(capsys)
    assert main(["train", "--out", str(reference_run)]) == 2
    assert "--resume" in _error_line(capsys)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((reference_run / "last.pt").read_bytes()[:5000])
    assert main(["eval", "--checkpoint", str(truncated)]) == 2
    assert "truncated or corrupt" in _error_line(capsys)
    assert main(["predict", "--checkpoint", str(reference_run / "best.pt"), "nope.png"]) == 2
    assert "nope.png" in _error_line(capsys)
    assert main(["predict", "--checkpoint", str(reference_run / "best.pt"), str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory: give image files" in _error_line(capsys)
    assert (
        main(["predict", "--checkpoint", str(reference_run / "best.pt"), "--top-k", "0", "x.png"])
        == 2
    )
    assert "--top-k must be ≥ 1" in _error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--momentum", "-1"], "momentum"),
        (["train", "--warmup-epochs", "nan"], "warm-up"),
        (["train", "--threads", "-1"], "threads"),
        (["train", "--input-size", "-4"], "input size"),
        (["train", "--device", "mps"], "unknown device"),
        (["train", "--data", "synthetic", "--data-option", "num_classes=0"], "num_classes"),
        (["train", "--data-option", "colour=3"], "takes no option"),
        (["train", "--data-root", "data"], "digits is built in and reads no files"),
        # The name is checked before the value: digits has no image_size to be wrong.
        (["train", "--data-option", "image_size=abc"], "digits takes no option 'image_size'"),
        (["train", "--cutout", "100"], "cutout 100 is larger than the 8×8 training images"),
        (["train", "--nesterov", "--momentum", "0"], "nesterov needs momentum > 0"),
        (["train", "--schedule", "cosine", "--gamma", "0.2"], "--gamma shapes the multistep"),
        (
            ["train", "--schedule", "constant", "--milestones", "0.5", "--gamma", "0.1"],
            "--milestones and --gamma shape the multistep schedule; this run's is constant",
        ),
        (["train", "--model-option", "dropuot=0.3"], "did you mean dropout"),
        (["train", "--model-option", "num_classes=5"], "num_classes comes from the data"),
        (["train", "--model-option", "dropout"], "--model-option takes KEY=VALUE"),
        (["train", "--model-option", "dropout=0.3", "--model", "resnet50"], "no such place"),
        (["train", "--model-option", "zero_init_residual=yes"], "must be True or False"),
        (["train", "--model", "plain20", "--model-option", "drop_path_rate=0.1"], "plain"),
    ],
)
def test_bad_training_options_are_one_line_and_exit_code_2(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in _error_line(capsys)


def test_run_dir_and_resume_mistakes_are_one_line(tmp_path, capsys, reference_run):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["train", "--out", str(afile)]) == 2
    assert "is a file" in _error_line(capsys)
    finished = tmp_path / "finished"
    shutil.copytree(reference_run, finished)
    assert main(["train", "--resume", str(finished)]) == 2
    assert "nothing to resume" in _error_line(capsys)
    assert main(["train", "--resume", str(finished), "--data-option", "seed=1"]) == 2
    assert "drop --data-option" in _error_line(capsys)
    state = read_checkpoint(finished / "last.pt")
    del state["optimizer"]
    torch.save(state, finished / "last.pt")
    assert main(["train", "--resume", str(finished)]) == 2
    assert "lacks optimizer" in _error_line(capsys)
    checkpoint = str(reference_run / "best.pt")
    assert main(["eval", "--checkpoint", checkpoint, "--batch-size", "0"]) == 2
    assert "--batch-size" in _error_line(capsys)
    assert main(["eval", "--checkpoint", checkpoint, "--plot", str(afile / "x.png")]) == 2
    assert "cannot write" in _error_line(capsys)
    assert main(["eval", "--checkpoint", checkpoint, "--data", "synthetic"]) == 2
    assert "checkpoint expects" in _error_line(capsys)


def _unfinished_copy(reference_run: Path, tmp_path: Path) -> Path:
    """The reference run with one more epoch to go, so that --resume has work to do."""
    run = tmp_path / "unfinished"
    shutil.copytree(reference_run, run)
    state = read_checkpoint(run / "last.pt")
    state["config"]["epochs"] += 1
    torch.save(state, run / "last.pt")
    return run


def _set(state: dict, key: str, value) -> None:
    state[key] = value


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda s: _set(s, "torch_rng", torch.zeros(3)), "its training state is damaged"),
        (lambda s: _set(s, "data_rng", torch.zeros(3)), "its training state is damaged"),
        (lambda s: _set(s, "epoch", "two"), "its training state is damaged"),
        (lambda s: s["config"].update(model="resnet56"), "does not fit the resnet56 its config"),
        (lambda s: s["config"].update(num_classes=3), "trained with 3 classes and digits now"),
    ],
    ids=["torch-rng", "data-rng", "epoch", "other-model", "other-classes"],
)
def test_a_damaged_run_to_resume_is_one_line_and_left_as_it_was(
    reference_run, tmp_path, capsys, damage, expected
):
    run = _unfinished_copy(reference_run, tmp_path)
    state = read_checkpoint(run / "last.pt")
    state["epoch_step"] = 5  # mid-epoch, so that the data order's state is read as well
    damage(state)
    torch.save(state, run / "last.pt")
    before = hashlib.sha256((run / "last.pt").read_bytes()).hexdigest()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert expected in _error_line(capsys)
    assert hashlib.sha256((run / "last.pt").read_bytes()).hexdigest() == before


def test_resume_names_a_path_that_is_no_run_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    assert main(["train", "--resume", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file: resume takes the run directory" in _error_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "gone")]) == 2
    assert "gone does not exist" in _error_line(capsys)


def _files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


@pytest.mark.parametrize(
    ("occupant", "option", "expected"),
    [
        ("best.pt/", (), "best.pt is a directory where the run writes a file"),
        ("metrics.jsonl/", (), "metrics.jsonl is a directory where the run writes a file"),
        ("tensorboard", ("--tensorboard",), "tensorboard is a file where --tensorboard writes"),
        ("experiment.json", (), "holds an experiment (experiment.json"),
        # Not this run's: kept, since a failed start removes the config.json it wrote.
        ("config.json", (), "holds config.json of another run: remove them or choose"),
    ],
    ids=[
        "best-pt-a-folder",
        "metrics-a-folder",
        "tensorboard-a-file",
        "an-experiment",
        "another-run-s-config",
    ],
)
def test_an_out_whose_files_cannot_be_written_is_refused_before_training(
    tmp_path, capsys, occupant, option, expected
):
    # Each used to surface only when the file was first written: after an epoch, or after
    # the whole run (best.pt, an experiment's summary.json overwritten).
    out = tmp_path / "run"
    out.mkdir()
    name = occupant.rstrip("/")
    if occupant.endswith("/"):
        (out / name).mkdir()
    else:
        (out / name).write_text("{}")
    before = _files_under(tmp_path)
    assert main(["train", *QUICK, *option, "--out", str(out)]) == 2
    assert expected in _error_line(capsys)
    assert _files_under(tmp_path) == before  # nothing written, nothing trained


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_output_locations_are_one_line_even_as_root(capsys):
    # /proc takes no new files, whoever asks: what a read-only mount does for other users.
    assert main(["train", *QUICK, "--out", "/proc/resunit-run"]) == 2
    assert "cannot write to --out /proc/resunit-run" in _error_line(capsys)
    assert main(["data", "download", "cifar10", "--root", "/proc/resunit-data"]) == 2
    assert "cannot write to --root /proc/resunit-data" in _error_line(capsys)


@pytest.mark.parametrize(
    ("command", "dropped", "expected"),
    [
        ("eval", "mean", "lacks mean"),
        ("predict", "classes", "lacks classes"),
        ("predict", "input_size", "lacks input_size"),
    ],
)
def test_a_checkpoint_without_what_feeding_it_takes_is_one_line(
    tmp_path, capsys, reference_run, command, dropped, expected
):
    state = read_checkpoint(reference_run / "best.pt")
    del state["config"][dropped]
    torch.save(state, tmp_path / "edited.pt")
    argv = [command, "--checkpoint", str(tmp_path / "edited.pt")]
    assert main([*argv, *(["x.png"] if command == "predict" else [])]) == 2
    assert f"{tmp_path / 'edited.pt'}: its config {expected}" in _error_line(capsys)


def test_a_run_on_a_relative_data_root_is_found_from_any_directory(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "work" / "shapes"
    for label in ("dark", "light"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            value = 40 * i if label == "dark" else 255 - 20 * i
            Image.new("L", (8, 8), value).save(folder / label / f"{i}.png")
    monkeypatch.chdir(tmp_path / "work")
    argv = ["--data", "imagefolder", "--data-root", "shapes", "--model", "resnet20"]
    assert main(["train", *argv, "--steps", "1", "--no-progress", "--out", "run"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded root is absolute
    assert main(["eval", "--checkpoint", "work/run/best.pt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] > 0
    folder.rename(tmp_path / "moved")
    assert main(["eval", "--checkpoint", "work/run/best.pt"]) == 2
    assert "is gone; give its place with data_root=, or --data-root" in _error_line(capsys)
    moved = ["--data-root", str(tmp_path / "moved")]
    assert main(["eval", "--checkpoint", "work/run/best.pt", *moved, "--json"]) == 0
    capsys.readouterr()
    # --resume takes --data-root too: the moved data is found (this run has no step left).
    assert main(["train", "--resume", "work/run"]) == 2
    assert "is gone; give its place with data_root=, or --data-root" in _error_line(capsys)
    assert main(["train", "--resume", "work/run", *moved]) == 2
    assert "has finished its 1 steps: nothing to resume" in _error_line(capsys)


def test_model_options_build_the_model_and_its_checkpoint_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--model-option", "shortcut=B", "--model-option", "zero_init_residual=true"]
    assert main(["train", *options, "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["model_overrides"] == {
        "shortcut": "B",
        "zero_init_residual": True,
    }
    model, _ = load_model(out / "last.pt")
    # ResNet-20 (269,722 on RGB; digits are grey: a stem with 2·16·9 weights fewer), plus
    # option B's projections where shapes change: 16→32 (512 + 64 BN), 32→64 (2,048 + 128).
    assert sum(p.numel() for p in model.parameters()) == 269_722 - 2 * 16 * 9 + 2_752
    assert [u.shortcut_kind for u in model.units()].count("projection") == 2


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    argv = ["train", "--data", "cifar10", "--data-root", str(tmp_path / "none"), "--out", str(out)]
    assert main(argv) == 2
    assert "cifar10 not found" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # a/b/run was made, write-tested and removed


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_crafted_or_of_another_architecture_are_refused(
    tmp_path, capsys, monkeypatch, reference_run
):
    monkeypatch.chdir(tmp_path)
    state = read_checkpoint(reference_run / "last.pt")
    torch.save({**state, "extra": _Exploit()}, tmp_path / "evil.pt")
    assert main(["eval", "--checkpoint", "evil.pt"]) == 2
    assert "refusing to load" in _error_line(capsys)
    assert not (tmp_path / "pwned").exists()
    state["config"]["model"] = "resnet32"
    torch.save(state, tmp_path / "other.pt")
    assert main(["predict", "--checkpoint", "other.pt", "x.png"]) == 2
    assert "missing layer1.3." in _error_line(capsys)


def test_non_finite_loss_is_one_line_naming_the_step(tmp_path, capsys):
    args = [
        "train",
        *QUICK,
        "--epochs",
        "2",
        "--lr",
        "0.05",
        "--gamma",
        "1e12",
        "--milestones",
        "0.5",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args) == 2
    line = _error_line(capsys)
    assert "at step" in line and "last good checkpoint" in line


def test_a_loss_gone_to_nan_before_the_first_checkpoint_leaves_nothing(tmp_path, capsys):
    # Without this the run directory kept config.json (and metrics), which `report` showed.
    out = tmp_path / "runs" / "nan"
    assert main(["train", *QUICK, "--epochs", "1", "--lr", "1e6", "--out", str(out)]) == 2
    assert "before its first checkpoint" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_data_download_from_a_local_archive(tmp_path, capsys):
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    args = [
        "data",
        "download",
        "cifar10",
        "--root",
        str(tmp_path / "data"),
        "--no-progress",
        "--url",
        archive.as_uri(),
        "--md5",
        md5,
    ]
    assert main(args) == 0 and "now in" in capsys.readouterr().out
    assert main(args) == 0 and "already in" in capsys.readouterr().out
    bad = [*args[:-1], "f" * 32]
    assert main([*bad[:4], str(tmp_path / "other"), *bad[5:]]) == 2
    assert "is not the archive that checksum names" in _error_line(capsys)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())
    # md5sum prints lower case, some sites upper: both name the same archive.
    upper = [*args[:4], str(tmp_path / "upper"), *args[5:-1], md5.upper()]
    assert main(upper) == 0 and "now in" in capsys.readouterr().out
    # Refused before any download: a checksum that is none, or one without the --url it checks.
    assert main([*args[:-1], "12345"]) == 2
    assert "must be 32 hexadecimal digits, got '12345'" in _error_line(capsys)
    assert main([*args[:6], "--md5", md5]) == 2
    assert "md5 (--md5) checks the archive at url (--url)" in _error_line(capsys)


def test_data_download_goes_where_training_looks_by_default(tmp_path, capsys, monkeypatch):
    # No --root: $RESUNIT_DATA, as `train --data cifar10` without --data-root reads it.
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        (src / name).write_bytes(pickle.dumps(batch, protocol=2))
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    monkeypatch.setenv("RESUNIT_DATA", str(tmp_path / "shared"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    argv = ["data", "download", "cifar10", "--no-progress", "--url", archive.as_uri()]
    assert main([*argv, "--md5", md5]) == 0
    assert (tmp_path / "shared" / "cifar-10-batches-py" / "batches.meta").is_file()
    assert len(load_dataset("cifar10", "test")) == 2  # found with no root given


@pytest.mark.parametrize("argv", [[], ["data"]], ids=["resunit", "resunit-data"])
def test_a_bare_command_prints_its_help_on_stderr_and_exits_2(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: resunit")


DDP_SCRIPT = """
import json, os, sys
import torch
from resunit.train import _epoch_seed, make_config, shard_indices, train
out = sys.argv[1]
config = make_config(epochs=2, batch_size=32, threads=1, out=out)
summary = train(config, progress=False)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
shards = [shard_indices(1437, torch.Generator().manual_seed(_epoch_seed(0, e)), rank, world)
          .tolist() for e in range(2)]
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump({"summary": summary, "shards": shards}, f)
"""


def test_torchrun_two_cpu_processes_train_one_model(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"run.rank{r}.json").read_text()) for r in range(2)]
    # Each rank saw a disjoint half of the data, reshuffled every epoch.
    for epoch in range(2):
        a, b = (set(r["shards"][epoch]) for r in ranks)
        assert not a & b and len(a) == len(b) == 718
    assert ranks[0]["shards"][0] != ranks[0]["shards"][1]
    # Identical weights on both ranks, and they are the ones rank 0 saved.
    digests = {r["summary"]["weights_sha256"] for r in ranks}
    assert digests == {digest_of(out / "last.pt")}
    # One set of outputs: rank 0 alone wrote the run directory.
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    assert read_checkpoint(out / "last.pt")["world_size"] == 2
    assert ranks[0]["summary"]["test_accuracy"] > 0.5


def test_train_keeps_freed_memory_for_the_next_step(tmp_path, monkeypatch):
    # The command owns its process, so it switches the allocator once, before training; the
    # library's train() never does (a process-wide change is the caller's decision).
    import resunit.allocator

    calls = []
    monkeypatch.setattr(resunit.allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    tiny = [
        "--data",
        "synthetic",
        "--data-option",
        "num_samples=64",
        "--data-option",
        "image_size=8",
    ]
    assert main(["train", *tiny, *QUICK, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert calls == [1]
    calls.clear()
    from resunit.train import make_config, train

    options = dict(num_samples=64, image_size=8)
    train(
        make_config(data="synthetic", data_options=options, epochs=1, out=str(tmp_path / "api")),
        progress=False,
    )
    assert calls == []


def test_threads_zero_overrides_the_recipe_and_keeps_torchs_setting(tmp_path, capsys):
    # The digits recipe runs on one thread; --threads 0 asks for torch's own setting instead,
    # and in either case the in-process caller's thread count is the same afterwards.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = tmp_path / "run"
        args = ["train", "--steps", "2", "--threads", "0", "--no-progress", "--json"]
        assert main([*args, "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["threads"] == 0
        assert torch.get_num_threads() == 2
        one = ["train", "--steps", "2", "--no-progress", "--json", "--out", str(tmp_path / "one")]
        assert main(one) == 0
        assert json.loads((tmp_path / "one" / "config.json").read_text())["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
