"""report: a self-contained HTML page whose sections are all there and whose images all decode."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from resunit.analysis import analyze_checkpoint
from resunit.cli import main
from resunit.errors import ConfigError
from resunit.experiments import DegradationConfig, run_degradation
from resunit.report import build_report, write_report
from resunit.train import make_config, train


class PageParser(HTMLParser):
    """Collects section ids, image sources and every URL-bearing attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "section":
            self.sections.append(values["id"] or "")
        if tag == "img":
            self.images.append(values["src"] or "")
        self.links += [v or "" for k, v in attrs if k in ("href", "src") and tag != "img"]


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def decode_images(sources: list[str]) -> list[tuple[int, int]]:
    sizes = []
    for src in sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:60]
        data = base64.b64decode(src[len(prefix) :], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a truncated PNG fails here
            sizes.append(image.size)
    return sizes


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits-resnet20"
    train(make_config(epochs=2, out=str(out), device="cpu"), progress=False)
    analyze_checkpoint(out / "best.pt", out_dir=out / "analysis", limit=120)
    return out


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "degradation"
    run_degradation(DegradationConfig(depths=[20], epochs=1, out=str(out), device="cpu"),
                    progress=False)  # fmt: skip
    return out


def test_training_report_has_every_section_and_every_image_decodes(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    parsed = parse(page)
    assert parsed.sections == [
        "configuration", "curves", "metrics", "inspection", "residual-ratios", "lesion"
    ]  # fmt: skip
    # curves, residual ratios, gradient flow, lesion: each a real, decodable PNG.
    sizes = decode_images(parsed.images)
    assert len(sizes) == 4 and all(w > 200 and h > 200 for w, h in sizes)
    assert "resnet20" in page and "layer3.2" in page and "option A pad" in page
    assert "Intact test accuracy" in page


def test_report_needs_no_network_and_no_other_file(run_dir):
    parsed = parse(build_report(run_dir))
    assert parsed.links == []  # no stylesheet, script or link to fetch
    assert not parsed.tags & {"script", "link", "iframe", "object"}
    assert all(src.startswith("data:") for src in parsed.images)


def test_experiment_report_shows_the_verdict_and_the_curves(experiment_dir):
    page = build_report(experiment_dir)
    parsed = parse(page)
    for section in ("configuration", "curves", "metrics", "inspection"):
        assert section in parsed.sections
    assert "one depth only" in page  # the verdict computed for this one-depth run
    assert "plain20" in page and "resnet20" in page
    assert len(decode_images(parsed.images)) == 1  # degradation.png


def test_a_directory_without_a_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a training run"):
        build_report(tmp_path)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as image:
        gray = image.convert("L")
        lo, hi = gray.getextrema()
    assert image.size == (1200, 2000)
    assert hi - lo > 100  # text and plots drawn, not a blank page


# --- user mistakes: one line on stderr, exit code 2, nothing written --------------------------


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("resunit: error: ")
    return captured.err


def files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A copy of the trained run that a test may damage, without a report in it yet."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report.html"))
    return copy


@pytest.fixture
def experiment_copy(experiment_dir, tmp_path):
    copy = tmp_path / "exp"
    shutil.copytree(experiment_dir, copy, ignore=shutil.ignore_patterns("report.html"))
    return copy


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", "--out {out} is a directory; give a file name"),
        ("a-file/report.html", "--out {out} is below {tmp}/a-file, which is a file"),
        # Passes every check and fails at the write itself: the temporary name beside it is
        # longer than a file name may be, so the write's OSError is what is reported.
        ("x" * 250 + ".html", "cannot write {out}: File name too long"),
    ],
    ids=["a-directory", "below-a-file", "the-write-fails"],
)
def test_an_out_that_cannot_be_written_is_one_line_and_leaves_nothing(
    run_dir, tmp_path, capsys, out, message
):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    before, run_before = files_under(tmp_path), files_under(run_dir)
    err = one_line_error(capsys, ["report", str(run_dir), "--out", str(tmp_path / out)])
    assert message.format(out=tmp_path / out, tmp=tmp_path) in err
    assert files_under(tmp_path) == before  # no page, no .tmp file
    assert files_under(run_dir) == run_before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_an_unwritable_folder_is_one_line(run_dir, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    err = one_line_error(capsys, ["report", str(run_dir), "--out", str(folder / "r.html")])
    assert f"cannot write {folder / 'r.html'}: Permission denied" in err
    assert list(folder.iterdir()) == []


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text("{\"model\": "),
         "config.json is not valid JSON (line 1"),
        (lambda d: (d / "config.json").write_text("[1, 2]"),
         "config.json does not hold a JSON object"),
        (lambda d: (d / "config.json").write_text("{}"), "config.json names no model"),
        (lambda d: _append(d / "metrics.jsonl", "{\"epoch\": 3,\n"),
         "metrics.jsonl line {lines} is not valid JSON"),
        (lambda d: (d / "analysis" / "analysis.json").write_bytes(b"\xff\xfe{"),
         "analysis.json is not a text file"),
        (lambda d: (d / "analysis" / "analysis.json").write_text("{\"residual_ratios\": []}"),
         "analysis.json lacks the field 'mean_ratio_per_stage'"),
        (lambda d: (d / "summary.json").write_text("{\"test_accuracy\": \"high\"}"),
         "summary.json holds a field of the wrong type"),
        # Without curves.png the report redraws the plot, which needs every epoch's fields.
        (lambda d: ((d / "curves.png").unlink(),
                    (d / "metrics.jsonl").write_text("{\"epoch\": 1, \"train_loss\": 1.0}\n")),
         "metrics.jsonl lacks the field 'train_accuracy'"),
    ],
    ids=["config-json", "config-list", "config-no-model", "metrics-line", "analysis-binary",
         "analysis-fields", "summary-type", "metrics-fields-for-the-plot"],
)  # fmt: skip
def test_a_damaged_training_run_is_one_line_naming_the_file(run_copy, capsys, damage, message):
    lines = len((run_copy / "metrics.jsonl").read_text().splitlines()) + 1  # the appended line
    damage(run_copy)
    err = one_line_error(capsys, ["report", str(run_copy)])
    assert message.format(lines=lines) in err
    assert str(run_copy) in err  # the full path of the file, so the user can find it
    assert not (run_copy / "report.html").exists()
    assert not [p for p in run_copy.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "experiment.json").write_text("{oops"),
         "experiment.json is not valid JSON (line 1"),
        (lambda d: (d / "summary.json").write_text("{\"networks\": 3, \"verdict\": \"x\"}"),
         "summary.json holds a field of the wrong type"),
        (lambda d: _append(d / "resnet20" / "history.jsonl", "garbage\n"),
         "resnet20/history.jsonl line 2 is not valid JSON"),
        (lambda d: _append(d / "plain20" / "history.jsonl", "{\"epoch\": 2}\n"),
         "plain20/history.jsonl line 2 lacks train_error, test_error, elapsed_seconds"),
    ],
    ids=["experiment-json", "summary-fields", "history-line", "history-fields"],
)  # fmt: skip
def test_a_damaged_experiment_is_one_line_naming_the_file(experiment_copy, capsys, damage, message):
    damage(experiment_copy)
    err = one_line_error(capsys, ["report", str(experiment_copy)])
    assert f"{experiment_copy}/{message}" in err
    assert not (experiment_copy / "report.html").exists()


def test_the_analysis_hint_names_a_checkpoint_that_exists(experiment_dir, run_copy):
    # An experiment's networks keep only last.pt; a training run has best.pt as well.
    page = build_report(experiment_dir)
    assert f"resunit analyze --checkpoint {experiment_dir / 'resnet20' / 'last.pt'}<" in page
    assert "best.pt" not in page
    shutil.rmtree(run_copy / "analysis")
    page = build_report(run_copy)
    assert f"resunit analyze --checkpoint {run_copy / 'best.pt'}<" in page


def test_a_plot_that_cannot_be_redrawn_only_leaves_the_plot_out(run_copy, monkeypatch):
    from resunit import plots

    def unwritable(metrics, path):
        raise ConfigError(f"cannot write the plot {path}: Permission denied")

    (run_copy / "curves.png").unlink()  # the report would redraw it, and that fails
    monkeypatch.setattr(plots, "plot_training_curves", unwritable)
    page = build_report(run_copy)
    assert "(training curves: no plot available)" in page
    assert "<img alt='training curves'" not in page and "Permission denied" not in page
    assert not (run_copy / "curves.png").exists()
