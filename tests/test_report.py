"""report: a self-contained HTML page whose sections are all there and whose images all decode."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from resunit.analysis import analyze_checkpoint
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
