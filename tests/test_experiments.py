"""experiments: the degradation runner on real digits (tiny), its resume, and its verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from resunit.checkpoint import load_model
from resunit.cli import main
from resunit.data import load_dataset
from resunit.errors import ConfigError
from resunit.evaluation import evaluate
from resunit.experiments import (
    DegradationConfig,
    degradation_verdict,
    read_histories,
    run_degradation,
    summarize_degradation,
    train_network,
)


def _row(family: str, depth: int, train_error: float, test_error: float = 0.5) -> dict:
    return {"family": family, "depth": depth, "final_train_error": train_error,
            "final_test_error": test_error}  # fmt: skip


def test_verdict_reports_degradation_when_the_numbers_show_it():
    rows = [_row("plain", 20, 0.02), _row("residual", 20, 0.015),
            _row("plain", 56, 0.08), _row("residual", 56, 0.01)]  # fmt: skip
    verdict = degradation_verdict(rows)
    assert verdict.startswith("Degradation reproduced")
    assert "plain20 2.00% → plain56 8.00%" in verdict
    assert "resnet20 1.50% → resnet56 1.00%" in verdict
    assert verdict.endswith("At depth 56 the residual net ends at 1.00% training error and "
                            "50.00% test error, the plain one at 8.00% and 50.00%.")  # fmt: skip


def test_verdict_says_when_there_is_no_degradation():
    rows = [_row("plain", 20, 0.010), _row("residual", 20, 0.010),
            _row("plain", 56, 0.012), _row("residual", 56, 0.0)]  # fmt: skip
    # 0.2 points apart is within the half-point margin: "about the same".
    assert degradation_verdict(rows).startswith("No degradation on this run")
    both = [_row("plain", 20, 0.0), _row("residual", 20, 0.0),
            _row("plain", 56, 0.2), _row("residual", 56, 0.1)]  # fmt: skip
    assert degradation_verdict(both).startswith("Both deeper nets train worse")
    assert degradation_verdict([_row("plain", 20, 0.1), _row("residual", 20, 0.0)]).startswith(
        "one depth only"
    )


def test_depths_need_a_plain_and_a_residual_network():
    assert DegradationConfig(depths=[56, 20]).model_names() == [
        "plain20", "resnet20", "plain56", "resnet56"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="depth 50 has no plain/residual pair"):
        DegradationConfig(depths=[20, 50]).model_names()


def test_tiny_experiment_trains_every_network_and_plots_them(tmp_path):
    out = tmp_path / "degradation"
    config = DegradationConfig(depths=[20], epochs=2, out=str(out), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the digits recipe trains on 1; the caller's 2 must come back
    try:
        summary = run_degradation(config, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

    histories = read_histories(out)
    assert sorted(histories) == ["plain20", "resnet20"]
    for history in histories.values():
        assert [h["epoch"] for h in history] == [1, 2]
        assert all(0 <= h["train_error"] <= 1 and 0 <= h["test_error"] <= 1 for h in history)
    assert [r["model"] for r in summary["networks"]] == ["plain20", "resnet20"]
    assert summary == {**json.loads((out / "summary.json").read_text())}
    with Image.open(out / "degradation.png") as image:
        image.verify()

    # The saved network is a loadable checkpoint whose test error is the one recorded.
    model, cfg = load_model(out / "resnet20" / "last.pt")
    assert cfg["model"] == "resnet20" and cfg["in_chans"] == 1
    accuracy = evaluate(model, load_dataset("digits", "test"))["accuracy"]
    assert 1 - accuracy == pytest.approx(histories["resnet20"][-1]["test_error"])
    resnet = next(r for r in summary["networks"] if r["model"] == "resnet20")
    train_accuracy = evaluate(model, load_dataset("digits", "train"))["accuracy"]
    assert resnet["final_train_error"] == pytest.approx(1 - train_accuracy)


def test_interrupted_network_resumes_to_the_same_weights(tmp_path):
    recipe = DegradationConfig(epochs=2, device="cpu").train_config()
    train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
    straight = train_network("resnet20", recipe, train_set, test_set, tmp_path / "a",
                             progress=False)  # fmt: skip

    class Stop(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        raise Stop(line)  # the line is printed after the epoch's checkpoint is saved

    with pytest.raises(Stop):
        train_network("resnet20", recipe, train_set, test_set, tmp_path / "b",
                      log=stop_after_first_epoch)  # fmt: skip
    assert len(read_histories(tmp_path)["b"]) == 1
    resumed = train_network("resnet20", recipe, train_set, test_set, tmp_path / "b",
                            progress=False)  # fmt: skip

    def drop_time(history):
        return [{k: v for k, v in h.items() if k != "elapsed_seconds"} for h in history]

    assert drop_time(resumed) == drop_time(straight)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_networks_are_skipped_and_other_settings_refused(tmp_path):
    out = tmp_path / "exp"
    config = DegradationConfig(depths=[20], epochs=1, out=str(out), device="cpu")
    run_degradation(config, progress=False)
    lines = []
    run_degradation(config, progress=True, log=lines.append)
    assert lines == [
        "plain20: trained earlier (1 epochs), skipped",
        "resnet20: trained earlier (1 epochs), skipped",
    ]
    # --epochs sets the recipe's epochs too: the message names the option once.
    with pytest.raises(ConfigError, match=r"other settings \(epochs\):"):
        run_degradation(DegradationConfig(depths=[20], epochs=3, out=str(out)), progress=False)
    # A training option is named as given (lr), not as train_options or recipe.lr.
    faster = DegradationConfig(depths=[20], epochs=1, out=str(out), train_options={"lr": 0.05})
    with pytest.raises(ConfigError, match=r"other settings \(lr\):"):
        run_degradation(faster, progress=False)


def test_summary_rows_come_from_the_histories():
    histories = {
        "plain20": [{"epoch": 1, "train_error": 0.5, "test_error": 0.4, "elapsed_seconds": 1.0},
                    {"epoch": 2, "train_error": 0.3, "test_error": 0.35, "elapsed_seconds": 2.0,
                     "final_train_error": 0.25}],
    }  # fmt: skip
    (row,) = summarize_degradation(histories)["networks"]
    assert row == {"model": "plain20", "family": "plain", "depth": 20, "epochs": 2,
                   "final_train_error": 0.25, "last_epoch_train_error": 0.3,
                   "final_test_error": 0.35, "best_test_error": 0.35, "seconds": 2.0}  # fmt: skip


# --- user mistakes: one line on stderr, exit code 2, checked before anything is written -------


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("resunit: error: ")
    return captured.err


def degradation_args(out: Path, *options: str) -> list[str]:
    return ["experiment", "degradation", "--depths", "20", "--epochs", "1", "--out", str(out),
            "--quiet", "--json", *options]  # fmt: skip


def test_a_mistake_leaves_no_trace_so_the_corrected_rerun_trains(tmp_path, capsys):
    out = tmp_path / "exp"
    missing = tmp_path / "no-cifar"
    err = one_line_error(capsys, degradation_args(out, "--data", "cifar10", "--data-root",
                                                  str(missing), "--device", "cpu"))  # fmt: skip
    assert "cifar10 not found" in err
    err = one_line_error(capsys, degradation_args(out, "--device", "tpu"))
    assert "unknown device 'tpu'" in err
    blanked = DegradationConfig(depths=[20], epochs=1, out=str(out), train_options={"cutout": 9})
    with pytest.raises(ConfigError, match="cutout 9 is larger than the 8×8 training images"):
        run_degradation(blanked, progress=False)
    assert not out.exists()  # no experiment.json claiming the directory for those settings
    # The corrected command is not refused as "other settings": the mistakes wrote nothing.
    assert main(degradation_args(out, "--device", "cpu")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in summary["networks"]] == ["plain20", "resnet20"]
    assert json.loads((out / "experiment.json").read_text())["data"] == "digits"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _a_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("not a folder")
    return tmp / "a-file"


def _below_a_file(tmp: Path) -> Path:
    return _a_file(tmp) / "exp"


def _summary_is_a_folder(tmp: Path) -> Path:
    (tmp / "exp" / "summary.json").mkdir(parents=True)
    return tmp / "exp"


def _network_is_a_file(tmp: Path) -> Path:
    (tmp / "exp").mkdir()
    (tmp / "exp" / "resnet20").write_text("not a folder")
    return tmp / "exp"


def _a_training_run(tmp: Path) -> Path:
    # `resunit train --out exp` was here: its summary.json would be overwritten.
    (tmp / "exp").mkdir()
    (tmp / "exp" / "config.json").write_text("{}")
    (tmp / "exp" / "summary.json").write_text('{"test_accuracy": 0.99}')
    return tmp / "exp"


def _dangling_link(tmp: Path) -> Path:
    # Passes every check and fails at the first write (mkdir meets the link): a disk that is
    # not mounted; the write's OSError is what is reported.
    (tmp / "exp").symlink_to(tmp / "unmounted")
    return tmp / "exp"


@pytest.mark.parametrize(
    ("make_out", "message"),
    [
        (_a_file, "--out {out} is a file; give a directory"),
        (_below_a_file, "--out {out} is below {tmp}/a-file, which is a file"),
        (_summary_is_a_folder, "{out}/summary.json is a directory where the experiment writes"),
        (_network_is_a_file, "{out}/resnet20 is a file where resnet20 keeps its checkpoints"),
        (_a_training_run, "{out} holds a training run (config.json, from `resunit train`)"),
        (_dangling_link, "cannot write {out}/experiment.json: File exists"),
    ],
    ids=[
        "a-file",
        "below-a-file",
        "summary-a-folder",
        "network-a-file",
        "a-training-run",
        "the-write-fails",
    ],
)
def test_an_out_that_cannot_hold_the_experiment_is_one_line(tmp_path, capsys, make_out, message):
    out = make_out(tmp_path)
    before = set(tmp_path.rglob("*"))
    err = one_line_error(capsys, degradation_args(out, "--device", "cpu"))
    assert message.format(out=out, tmp=tmp_path) in err
    assert set(tmp_path.rglob("*")) == before  # nothing trained, nothing written, no .tmp


def test_a_damaged_experiment_json_is_one_line_and_kept(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "experiment.json").write_text('{"experiment": "degrada')
    err = one_line_error(capsys, degradation_args(out, "--device", "cpu"))
    assert f"{out / 'experiment.json'} is damaged (not a JSON object): remove it" in err
    assert (out / "experiment.json").read_text() == '{"experiment": "degrada'
    assert sorted(p.name for p in out.iterdir()) == ["experiment.json"]


def test_a_damaged_history_names_its_file_and_line(tmp_path):
    history = tmp_path / "resnet20" / "history.jsonl"
    history.parent.mkdir()
    record = {"epoch": 1, "train_error": 0.5, "test_error": 0.4, "elapsed_seconds": 1.0}
    history.write_text(json.dumps(record) + "\n\n" + json.dumps({**record, "test_error": None}))
    with pytest.raises(ConfigError, match=r"history.jsonl line 3 lacks test_error$"):
        read_histories(tmp_path)
    history.write_text(json.dumps(record) + "\n[1, 2]\n")
    with pytest.raises(ConfigError, match=r"history.jsonl line 2 is not a JSON object"):
        read_histories(tmp_path)
