"""`resunit export` and `resunit bench` end to end: what they write, print and refuse."""

import json
from pathlib import Path

import pytest
import torch

from resunit import deploy
from resunit.checkpoint import load_model, save_checkpoint
from resunit.cli import main
from resunit.data import load_dataset
from resunit.deploy import onnx_export
from resunit.models import create_model

needs_onnx = pytest.mark.skipif(not deploy.onnx_available(), reason="needs the [onnx] extra")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A digits-shaped ResNet-20 checkpoint as `resunit train` writes it (weights untrained)."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    config = {
        "model": "resnet20",
        "data": "digits",
        "dataset": "digits",
        "num_classes": 10,
        "in_chans": 1,
        "input_size": 8,
        "image_size": [8, 8],
        "mean": [0.3],
        "std": [0.4],
    }
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint({"config": config, "model": model.state_dict()}, path)
    return path


@needs_onnx
def test_export_writes_a_verified_onnx_file_and_says_so(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file()
    assert "verified in ONNX Runtime" in printed and "1×8×8" in printed


@needs_onnx
def test_export_dynamic_batch_json_reports_the_check(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--dynamic-batch"]
    assert main([*argv, "--input", "1x16x16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verified"] is True and result["max_relative_difference"] <= 1e-4
    assert result["input"] == [1, 16, 16] and result["verified_batches"] == [1, 3]
    # The file really takes another batch size and input size than it was traced with.
    runner = deploy.OnnxRuntimeModel(out)
    assert runner.batch_size is None  # dynamic in the file, not run in pieces
    assert runner.run(torch.randn(5, 1, 16, 16)).shape == (5, 10)


@needs_onnx
def test_export_int8_reports_accuracy_before_and_after(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.int8.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(out), "--int8"]
    assert main([*argv, "--calibration-batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.is_file() and result["format"].startswith("int8")
    assert result["calibration_images"] == 64 and result["test_images"] == 360
    # The same three numbers worked out here: the digits test split normalised with the
    # checkpoint's statistics, run through the float32 model and the written int8 file.
    test = load_dataset("digits", "test")
    x = ((test.images.double() / 255 - 0.3) / 0.4).float()  # the fixture's mean and std
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        float_picks = model(x).argmax(1)
    int8_picks = deploy.OnnxRuntimeModel(out).run(x).argmax(1)
    one_image = 1 / len(test)  # room for one near-tie that rounding may tip either way
    for key, picks, reference in [
        ("accuracy_float32", float_picks, test.labels),
        ("accuracy_int8", int8_picks, test.labels),
        ("top1_agreement", int8_picks, float_picks),
    ]:
        share = (picks == reference).double().mean().item()
        assert result[key] == pytest.approx(share, abs=one_image * 1.01), key


@needs_onnx
def test_export_errors_name_the_file_asked_for_not_its_temporary_twin(
    checkpoint, tmp_path, capsys, monkeypatch
):
    def fails(path, *args, **kwargs):
        raise deploy.DeployError(f"{path}: ONNX Runtime output differs from PyTorch")

    monkeypatch.setattr(deploy, "verify_onnx", fails)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"resunit: error: {out}: ONNX Runtime output differs from PyTorch\n"
    assert list(tmp_path.iterdir()) == []  # and nothing is left beside it


@needs_onnx
def test_export_of_a_model_that_outputs_nan_says_so(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["fc.bias"][0] = float("nan")
    broken = tmp_path / "nan.pt"
    save_checkpoint(state, broken)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(broken), "--onnx", str(out)]) == 2
    assert "the model itself outputs NaN or infinity" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--data-root", "d"], "--data-root is for --int8"),
        (["--calibration", "minmax"], "--calibration is for --int8"),
        (["--calibration-batches", "0"], "--calibration-batches is for --int8"),
        (["--calibration-batches", "2", "--data-root", "d"], "--calibration-batches, --data-root"),
    ],
)
def test_export_int8_options_without_int8_are_refused_rather_than_ignored(
    checkpoint, capsys, options, message
):
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", "m.onnx", *options]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--onnx", "x.onnx"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "error:" in err


@needs_onnx
def test_export_with_a_malformed_input_shape_is_exit_2(checkpoint, tmp_path, capsys):
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / "m.onnx")]
    assert main([*argv, "--input", "8x8"]) == 2
    assert "C×H×W" in capsys.readouterr().err
    # A well-formed shape with the wrong channel count: also one line, not a traceback.
    assert main([*argv, "--input", "3x8x8"]) == 2
    assert "1-channel" in capsys.readouterr().err


def test_bench_prints_every_variant_with_ratios(capsys):
    argv = ["bench", "resnet20", "--input", "3x8x8", "--batch", "1,2", "--repeats", "1"]
    argv += ["--threads", "1"]
    assert main([*argv, "--variants", "eager,folded,folded_cl", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["results"]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for b in (1, 2) for v in ("eager", "folded", "folded_cl")
    ]
    assert all(r["images_per_second"] > 0 for r in rows)
    assert all(r["max_relative_difference"] <= 1e-5 for r in rows)
    assert all(r["vs_eager"] == 1.0 for r in rows if r["variant"] == "eager")
    # No ONNX Runtime variant asked for: no ratio to it, and the table says so with a dash.
    assert all(r["vs_onnxruntime"] is None and r["vs_onnxruntime_paired"] is None for r in rows)
    assert main([*argv, "--variants", "eager"]) == 0
    table = capsys.readouterr().out
    eager_lines = [line.split() for line in table.splitlines() if line.startswith("eager")]
    assert [cells[4] for cells in eager_lines] == ["-", "-"] and "confidence" not in table


@needs_onnx
def test_bench_table_includes_onnxruntime(capsys):
    argv = ["bench", "resnet20", "--input", "3x8x8", "--batch", "2", "--repeats", "1"]
    assert main([*argv, "--variants", "eager,onnxruntime"]) == 0
    captured = capsys.readouterr()
    assert "× best ORT" in captured.out
    assert any(line.startswith("onnxruntime") for line in captured.out.splitlines())
    assert "building 2 variants" in captured.err  # progress goes to stderr, not the table


@needs_onnx
def test_bench_ratio_to_onnxruntime_is_to_the_faster_of_its_two_modes(capsys):
    argv = ["bench", "resnet20", "--input", "3x8x8", "--batch", "2", "--repeats", "1", "--json"]
    assert main([*argv, "--variants", "eager,onnxruntime,onnxruntime_spin"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    faster = max(rows[n]["images_per_second"] for n in ("onnxruntime", "onnxruntime_spin"))
    for row in rows.values():
        assert row["vs_onnxruntime"] == pytest.approx(row["images_per_second"] / faster)


@needs_onnx
def test_bench_gives_each_ratio_to_onnxruntime_round_by_round_with_an_interval(capsys):
    argv = ["bench", "resnet20", "--input", "3x8x8", "--batch", "2", "--repeats", "5"]
    assert main([*argv, "--variants", "eager,onnxruntime", "--json"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    # The reference against itself: every round's ratio is exactly 1.
    itself = rows["onnxruntime"]["vs_onnxruntime_paired"]
    assert (itself["low"], itself["median"], itself["high"], itself["rounds"]) == (1, 1, 1, 5)
    eager = rows["eager"]["vs_onnxruntime_paired"]
    assert eager["low"] <= eager["median"] <= eager["high"]
    assert eager["confidence"] == pytest.approx(1 - 2 / 2**5)  # 5 rounds: their whole range
    # The same direction as vs_onnxruntime (above 1: faster than ONNX Runtime), not its inverse:
    # eager PyTorch is several times slower than ONNX Runtime here.
    assert rows["eager"]["vs_onnxruntime"] < 1.0 and eager["median"] < 1.0
    assert main([*argv, "--variants", "eager,onnxruntime"]) == 0
    table = capsys.readouterr().out
    ort_line = next(line for line in table.splitlines() if line.startswith("onnxruntime"))
    assert "1.00 (1.00-1.00)" in ort_line
    assert "94% confidence" in table  # 1 - 2/32, as the footnote says
    # Two rounds are too few for an interval worth showing: the median alone.
    assert main([*argv[:-1], "2", "--variants", "eager,onnxruntime"]) == 0
    table = capsys.readouterr().out
    assert "(few rounds)" in table and "confidence" not in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["resnet9000"], "unknown model"),
        (["resnet20", "--batch", "0"], "--batch"),
        (["resnet20", "--variants", "eager,warp"], "--variants takes some of"),
        (["resnet20", "--variants", ","], "--variants takes a comma-separated list"),
        (["resnet20", "--variants", "int8"], "benchmarks/inference.py"),
        (["resnet20", "--batch", "1,,32"], "--batch takes a comma-separated list with no empty"),
        (["resnet20", "--variants", "eager,eager"], "--variants names eager more than once"),
    ],
)
def test_bench_user_errors_are_one_line_and_exit_2(extra, message, capsys):
    assert main(["bench", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@needs_onnx
def test_a_failed_check_leaves_no_file_and_keeps_the_previous_export(
    checkpoint, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier, good export")
    monkeypatch.setattr(onnx_export, "relative_difference", lambda actual, expected: 1.0)
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(out)]) == 2
    assert "not trustworthy" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left


@needs_onnx
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_export_to_a_place_that_takes_no_files_is_one_line(checkpoint, capsys):
    # /proc takes no new files, even from root: what a read-only mount does for other users.
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", "/proc/m.onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write --onnx /proc/m.onnx" in err


@needs_onnx
@pytest.mark.parametrize("kind", ["directory", "under_a_file", "empty", "int8_not_square"])
def test_export_output_and_shape_mistakes_are_one_line(checkpoint, tmp_path, capsys, kind):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    out = {"directory": "adir", "under_a_file": "afile/m.onnx", "empty": ""}.get(kind, "m.onnx")
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(tmp_path / out) if out else ""]
    if kind == "int8_not_square":
        argv += ["--int8", "--input", "1x8x16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
