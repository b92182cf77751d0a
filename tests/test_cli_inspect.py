"""`resunit inspect`, `analyze`, `experiment` and `report`, end to end on real digits."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from resunit.checkpoint import load_model
from resunit.cli import main
from resunit.cli.inspect import _count
from resunit.data import load_dataset
from resunit.evaluation import evaluate
from resunit.train import make_config, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    train(make_config(epochs=2, out=str(out), device="cpu"), progress=False)
    return out / "best.pt"


def one_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"resunit: error: {prefix}"), err
    assert err.count("\n") == 1
    return err


# --- inspect --------------------------------------------------------------------------------


def test_inspect_json_totals_match_torchvision(capsys):
    assert main(["inspect", "resnet50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total_macs"] == 4_089_184_256 and result["total_parameters"] == 25_557_032
    assert result["units"][0]["name"] == "stem" and result["units"][-1]["name"] == "head"


def test_inspect_table_says_why_each_shortcut(capsys):
    assert main(["inspect", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "projection 1×1/2: 64→128 channels, 56→28 pixels" in out
    assert "64×56×56 → 128×28×28" in out and "identity: shapes match" in out
    assert out.rstrip().endswith(
        "total: 11,689,512 parameters, 1,814,073,344 MACs (1.814 G) per image"
    )


def test_inspect_with_another_input(capsys):
    assert main(["inspect", "resnet20", "--input", "1x8x8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"] == [1, 8, 8]
    assert result["units"][-2]["output_shape"] == [64, 2, 2]


def test_inspect_a_checkpoint_uses_its_training_input(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"] == [1, 8, 8] and result["model"].startswith("resnet20")


def test_inspect_block_walks_the_example_layer_by_layer(capsys):
    args = ["inspect", "block", "--in", "64", "--out", "128", "--stride", "2", "--size", "56"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("BasicBlock: 64×56×56 → 128×28×28; shortcut projection 1×1/2")
    assert "conv 3×3/2 64→128" in out and "57,802,752" in out  # 28·28·128·64·9
    assert "downsample.0" in out and "ReLU(F(x) + shortcut(x))" in out


def test_inspect_block_out_channels_and_its_hidden_alias(capsys):
    base = ["inspect", "block", "--in", "64", "--stride", "1", "--size", "8", "--json"]
    assert main([*base, "--out-channels", "256", "--block", "bottleneck"]) == 0
    walk = json.loads(capsys.readouterr().out)
    assert walk["output_shape"] == [256, 8, 8]
    assert main([*base, "--out", "256", "--block", "bottleneck"]) == 0  # the old spelling
    assert json.loads(capsys.readouterr().out) == walk
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    help_text = capsys.readouterr().out
    assert "--out-channels" in help_text
    assert not re.search(r"--out(?!-channels)", help_text)  # --out is not offered for a unit


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (999, "999"),
        (40_551_040, "40.55M"),
        (1_814_073_344, "1.814G"),
        (46_080 * 10**9, "46.080T"),
        (3 * 10**15, "3.000P"),
    ],
)
def test_counts_switch_to_larger_prefixes(n, text):
    assert _count(n) == text


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["inspect", "resnet19"], "unknown model 'resnet19'"),
        (["inspect", "resnet18", "--input", "224x224"], "--input must look like"),
        (["inspect", "block", "--block", "bottleneck", "--out", "130"], "a bottleneck unit"),
        (["inspect", "block", "--in", "64", "--out", "32", "--shortcut", "A"], "shortcut 'pad'"),
        (["inspect", "block", "--out-channels", "-4", "--block", "bottleneck"], "--in, --out-c"),
        (["inspect", "block", "--size", "0"], "--size must be ≥ 1"),
        (["inspect", "missing.pt"], "checkpoint not found"),
        # Options of one unit are refused for a whole model instead of being ignored.
        (["inspect", "resnet18", "--stride", "1"], "--stride applies to a single unit"),
        (["inspect", "resnet18", "--in", "3", "--size", "64"], "--in, --size apply to a single"),
        (["inspect", "resnet18", "--out-channels", "10"], "--out-channels applies to a single"),
        (["inspect", "resnet18", "--block", "basic"], "--block applies to a single unit"),
        (["inspect", "block", "--input", "3x32x32"], "--input applies to a model"),
    ],
)
def test_inspect_user_errors_are_one_line_and_exit_2(argv, prefix, capsys):
    assert main(argv) == 2
    one_error_line(capsys, prefix)


def test_inspect_a_run_directory_names_the_checkpoint_to_give(checkpoint, capsys):
    # `resunit inspect runs/x` is a checkpoint meant, not an unknown model "runs/x".
    assert main(["inspect", str(checkpoint.parent)]) == 2
    one_error_line(capsys, f"{checkpoint.parent} is a directory: give a checkpoint file")


# --- analyze --------------------------------------------------------------------------------


def test_analyze_json_and_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, _ = load_model(checkpoint)
    intact = evaluate(model, load_dataset("digits", "test"))["accuracy"]
    assert result["lesion"]["intact_accuracy"] == pytest.approx(intact)
    assert result["test_images"] == 360
    assert [r["name"] for r in result["residual_ratios"]] == [n for n, _ in model.named_units()]
    assert json.loads((out / "analysis.json").read_text()) == result
    for name in ("residual_ratios.png", "lesion.png", "gradient_flow.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    # Written through temporary files that were all renamed: nothing else is left.
    assert sorted(os.listdir(out)) == [
        "analysis.json",
        "gradient_flow.png",
        "lesion.png",
        "residual_ratios.png",
    ]


def test_analyze_table_for_people(checkpoint, capsys):
    assert main(["analyze", "--checkpoint", str(checkpoint), "--limit", "50", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "on 50 digits test images" in out and "intact test accuracy" in out
    assert "worst single-unit lesion: layer" in out and "mean residual ratio per stage" in out
    assert "resnet20 without shortcuts" in out
    assert (checkpoint.parent / "analysis" / "analysis.json").is_file()


def test_analyze_user_errors(checkpoint, tmp_path, capsys):
    assert main(["analyze", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    one_error_line(capsys, "checkpoint not found")
    assert main(["analyze", "--checkpoint", str(checkpoint), "--data", "synthetic"]) == 2
    one_error_line(capsys, "synthetic has 10 classes × 3 channels but the checkpoint expects")
    assert main(["analyze", "--checkpoint", str(checkpoint), "--limit", "0"]) == 2
    one_error_line(capsys, "limit (--limit) must be an integer ≥ 1")


# --- experiment and report ------------------------------------------------------------------


def test_experiment_prints_table_and_verdict_then_report(tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["experiment", "degradation", "--depths", "20", "--epochs", "1", "--out", str(out),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "plain20" in text and "resnet20" in text and "train error" in text
    assert "one depth only" in text
    assert main([*argv, "--json"]) == 0  # rerun: resumes, nothing left to train
    summary = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in summary["networks"]] == ["plain20", "resnet20"]

    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'report.html'}"
    assert '<section id="metrics">' in (out / "report.html").read_text()


def test_a_registered_name_means_the_model_even_beside_a_file_of_that_name(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet20").write_text("not a checkpoint")
    assert main(["inspect", "resnet20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "resnet20"
    assert main(["inspect", "./resnet20"]) == 2  # the file, named as a path
    one_error_line(capsys, "resnet20 is not a readable checkpoint")


def test_experiment_and_report_user_errors(tmp_path, capsys):
    assert main(["experiment", "degradation", "--depths", "21", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "depth 21 has no plain/residual pair")
    assert main(["experiment", "degradation", "--depths", "20", "56", "20"]) == 2
    one_error_line(capsys, "depth 20 is given twice")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    one_error_line(capsys, f"{tmp_path / 'nothing'} is not a directory")
    assert main(["report", str(tmp_path)]) == 2
    one_error_line(capsys, f"{tmp_path} holds neither")


@pytest.fixture
def no_analysis(monkeypatch):
    """Fail the test if the analysis starts: options and --out are checked before it."""

    def analysis_started(*args, **kwargs):
        raise AssertionError("the analysis ran before its options were checked")

    monkeypatch.setattr("resunit.analysis.residual_ratios", analysis_started)


@pytest.mark.parametrize("size", ["0", "-5"])
def test_analyze_refuses_a_batch_size_below_one(checkpoint, tmp_path, size, capsys, no_analysis):
    out = tmp_path / "analysis"
    argv = ["analyze", "--checkpoint", str(checkpoint), "--batch-size", size, "--out", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, f"batch_size (--batch-size) must be an integer ≥ 1, got {size}")
    assert not out.exists()


def test_analyze_checks_out_before_any_work(checkpoint, tmp_path, capsys, no_analysis):
    def analyze(out):
        return main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)])

    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    assert analyze(a_file) == 2
    one_error_line(capsys, f"--out {a_file} is a file")
    assert analyze(a_file / "analysis") == 2
    one_error_line(capsys, f"--out {a_file / 'analysis'} is below {a_file}, which is a file")
    assert a_file.read_text() == "keep"

    taken = tmp_path / "taken"
    (taken / "analysis.json").mkdir(parents=True)
    assert analyze(taken) == 2
    one_error_line(capsys, f"{taken / 'analysis.json'} is a directory")
    (taken / "analysis.json").rmdir()
    (taken / "lesion.png").mkdir()
    assert analyze(taken) == 2
    one_error_line(capsys, f"{taken / 'lesion.png'} is a directory")
    assert os.listdir(taken) == ["lesion.png"]  # no probe or temporary file left behind


def test_analyze_out_that_cannot_be_written(checkpoint, tmp_path, capsys, no_analysis, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    # What a read-only directory does to anyone but root (the test may run as root).
    monkeypatch.setattr("resunit.outputs.tempfile.TemporaryFile", denied)
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    one_error_line(capsys, f"cannot write to --out {out}: Permission denied")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_analyze_out_in_a_read_only_directory(checkpoint, tmp_path, capsys, no_analysis):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(locked)]) == 2
        one_error_line(capsys, f"cannot write to --out {locked}: Permission denied")
        assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(locked / "a")]) == 2
        one_error_line(capsys, f"cannot write to --out {locked / 'a'}: Permission denied")
    finally:
        locked.chmod(0o700)


def test_analyze_a_failed_write_is_one_line_and_leaves_no_file(
    checkpoint, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def disk_full(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    out = tmp_path / "analysis"
    argv = ["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--limit", "20"]
    assert main(argv) == 2
    one_error_line(capsys, "cannot write the plot ")
    assert os.listdir(out) == []  # neither half a PNG nor its temporary file
