"""One self-contained HTML page for a training run or an experiment (plots embedded).

The page needs no network access: styles are inline and every plot is a PNG embedded as a
``data:`` URI. It shows what the run directory holds: configuration, curves, final metrics,
the inspection table of the model, and residual ratios and lesion results where
``resunit analyze`` has written them (``analysis/analysis.json`` next to the checkpoint).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from resunit.errors import ConfigError, ResunitError
from resunit.outputs import check_output_location, read_jsonl, read_text, write_text

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.verdict { background: #f5f9ff; border-left: 4px solid #3a7bd5; padding: .6em 1em; }
.note { color: #666; }
"""


def write_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``).

    A place the page cannot be written to is a :class:`ConfigError` (one line in the CLI),
    checked before the page is built; a failed write leaves neither a page nor a temp file.
    """
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / "report.html"
    check_output_location(path, "--out")
    page = build_report(run_dir)
    return write_text(path, page)  # atomic: a browser never sees half a page


def build_report(run_dir: str | os.PathLike[str]) -> str:
    """The HTML page of a training run (``config.json``) or an experiment (``experiment.json``)."""
    run_dir = Path(run_dir)
    if (run_dir / "experiment.json").is_file():
        title, sections = _experiment_sections(run_dir)
    elif (run_dir / "config.json").is_file():
        title, sections = _training_sections(run_dir)
    else:
        raise ConfigError(
            f"{run_dir} holds neither a training run (config.json, from `resunit train`) nor an "
            "experiment (experiment.json, from `resunit experiment`)"
        )
    body = "\n".join(
        f'<section id="{key}">\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>'
        for key, heading, content in sections
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class='note'>{html.escape(str(run_dir))}</p>\n"
        f"{body}\n</body>\n</html>\n"
    )


# --- building blocks ------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when there is no such file; anything else that is
    not a JSON object is a damaged run directory, named so the user can remove or fix it."""
    if not path.is_file():
        return None
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return value


@contextlib.contextmanager
def _fields_of(path: Path) -> Iterator[None]:
    """Turn a missing or mistyped field of the records read from ``path`` into one line that
    names the file: valid JSON can still lack what the page shows (damaged, or hand-edited)."""
    try:
        yield
    except ResunitError:
        raise
    except KeyError as exc:
        raise ConfigError(f"{path} lacks the field {exc}; the run directory is damaged") from None
    except (TypeError, AttributeError, ValueError):
        raise ConfigError(
            f"{path} holds a field of the wrong type; the run directory is damaged"
        ) from None


def _image(path: Path | None, alt: str) -> str:
    """The PNG at ``path`` embedded as a data URI (no file or network needed to view it)."""
    if path is None or not path.is_file():
        return f"<p class='note'>({html.escape(alt)}: no plot available)</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text, cls = f"{value:.4g}", " class='num'"
    elif isinstance(value, int) and not isinstance(value, bool):
        text, cls = f"{value:,}", " class='num'"
    elif isinstance(value, (list, dict)):
        text, cls = json.dumps(value), ""
    else:
        text, cls = "" if value is None else str(value), ""
    return f"<td{cls}>{html.escape(text)}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _key_values(mapping: dict[str, Any]) -> str:
    return _table(["setting", "value"], [(k, v) for k, v in mapping.items()])


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _inspection(config: dict[str, Any], source: Path) -> str:
    """The inspection table of the model a run trained (its config read from ``source``),
    built on the meta device."""
    import torch

    from resunit.analysis import inspect_model, shape_text
    from resunit.models import create_model

    with _fields_of(source), torch.device("meta"):
        model = create_model(
            config["model"],
            num_classes=config.get("num_classes"),
            in_chans=config.get("in_chans"),
            **dict(config.get("model_overrides") or {}),
        )
        size = int(config.get("input_size") or 32)
    result = inspect_model(model, (model.in_chans, size, size))
    rows = [
        (
            r["name"],
            f"{shape_text(r['input_shape'])} → {shape_text(r['output_shape'])}",
            r["shortcut_reason"],
            r["residual_params"],
            r["residual_macs"],
            r["shortcut_params"],
            r["shortcut_macs"],
        )
        for r in result["units"]
    ]
    headers = ["unit", "shape", "shortcut (why)", "F params", "F MACs", "sc params", "sc MACs"]
    return (
        f"<p>{html.escape(config['model'])} on {model.in_chans}×{size}×{size} input: "
        f"{result['total_parameters']:,} parameters, {result['total_macs']:,} multiply-"
        "accumulates per image (torch.utils.flop_counter).</p>\n" + _table(headers, rows)
    )


def _analysis_sections(analysis_dir: Path, label: str = "") -> list[tuple[str, str, str]]:
    """Residual-ratio and lesion sections from ``resunit analyze`` output, where present."""
    suffix = f": {label}" if label else ""
    key = f"-{label}" if label else ""
    path = analysis_dir / "analysis.json"
    result = _read_json(path)
    if result is None:
        hint = _analysis_hint(analysis_dir.parent)
        return [(f"residual-ratios{key}", f"Residual ratios{suffix}", hint),
                (f"lesion{key}", f"Lesion study{suffix}", hint)]  # fmt: skip
    with _fields_of(path):
        return _analysis_html(result, analysis_dir, key, suffix)


def _analysis_hint(run_dir: Path) -> str:
    # A training run keeps best.pt (and last.pt); an experiment's networks only last.pt.
    checkpoint = next(
        (run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None
    )
    if checkpoint is None:
        return (
            f"<p class='note'>No analysis yet, and no checkpoint in {html.escape(str(run_dir))} "
            "to analyse: train it first, then run <code>resunit analyze</code> on its "
            "checkpoint and rebuild this report.</p>"
        )
    return (
        "<p class='note'>No analysis yet: run <code>resunit analyze --checkpoint "
        f"{html.escape(str(checkpoint))}</code> and rebuild this report.</p>"
    )


def _analysis_html(
    result: dict[str, Any], analysis_dir: Path, key: str, suffix: str
) -> list[tuple[str, str, str]]:
    ratios = result["residual_ratios"]
    stages = ", ".join(f"{k} {v:.3f}" for k, v in result["mean_ratio_per_stage"].items())
    ratio_html = (
        f"<p>‖F(x)‖/‖x‖ per unit on {result['test_images']} {html.escape(result['data'])} test "
        f"images. Mean per stage: {html.escape(stages)}.</p>\n"
        + _image(analysis_dir / "residual_ratios.png", "residual ratios")
        + _table(
            ["unit", "shortcut", "‖F(x)‖/‖x‖", "std of F(x)"],
            [(r["name"], r["shortcut"], r["residual_ratio"], r["residual_std"]) for r in ratios],
        )
        + _image(analysis_dir / "gradient_flow.png", "gradient flow at initialisation")
    )
    lesion = result["lesion"]
    worst = result.get("worst_lesion")
    worst_text = (
        f" Worst single-unit lesion: {worst['name']} → {_percent(worst['accuracy'])}."
        if worst
        else ""
    )
    lesion_html = (
        f"<p>Intact test accuracy {_percent(lesion['intact_accuracy'])}.{html.escape(worst_text)}"
        "</p>\n"
        + _image(analysis_dir / "lesion.png", "lesion study")
        + _table(
            ["unit removed", "shortcut", "accuracy", "drop"],
            [
                (r["name"], r["shortcut"], _percent(r["accuracy"]), _percent(r["drop"]))
                for r in lesion["units"]
            ],
        )
    )
    return [(f"residual-ratios{key}", f"Residual ratios{suffix}", ratio_html),
            (f"lesion{key}", f"Lesion study{suffix}", lesion_html)]  # fmt: skip


# --- a training run -------------------------------------------------------------------------


def _training_sections(run_dir: Path) -> tuple[str, list[tuple[str, str, str]]]:
    config_path = run_dir / "config.json"
    config = _read_json(config_path) or {}
    if not isinstance(config.get("model"), str):
        raise ConfigError(f"{config_path} names no model; the run directory is damaged")
    metrics_path = run_dir / "metrics.jsonl"
    metrics = read_jsonl(metrics_path)
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path)
    title = f"Training run: {config.get('model')} on {config.get('data', config.get('dataset'))}"
    curves = run_dir / "curves.png"
    if not curves.exists() and metrics:  # a folder of that name: no plot, no stray file
        with _fields_of(metrics_path):  # the plot reads fields the table below may not
            curves = _regenerate(lambda p: _plots().plot_training_curves(metrics, p), curves)
    shown = {k: v for k, v in config.items() if k not in ("classes", "mean", "std")}
    with _fields_of(metrics_path):
        curve_rows = [
            (m["epoch"], m.get("train_loss"), _percent(m.get("train_accuracy")),
             _percent(m.get("val_accuracy")) if "val_accuracy" in m else "", m.get("lr"))
            for m in metrics
        ]  # fmt: skip
    curve_html = _image(curves, "training curves") + _table(
        ["epoch", "train loss", "train accuracy", "val accuracy", "lr"], curve_rows
    )
    if summary:
        final = {k: v for k, v in summary.items() if k != "per_class_accuracy"}
        if "test_accuracy" in summary:
            with _fields_of(summary_path):
                final["test_accuracy"] = _percent(summary["test_accuracy"])
        metrics_html = _key_values(final)
    elif metrics:
        metrics_html = "<p class='note'>The run has not finished; its last epoch:</p>" + (
            _key_values(metrics[-1])
        )
    else:
        metrics_html = "<p class='note'>No epoch finished yet.</p>"
    sections = [
        ("configuration", "Configuration", _key_values(shown)),
        ("curves", "Curves", curve_html),
        ("metrics", "Final metrics", metrics_html),
        ("inspection", "Inspection", _inspection(config, config_path)),
        *_analysis_sections(run_dir / "analysis"),
    ]
    return title, sections


# --- an experiment --------------------------------------------------------------------------


def _experiment_sections(run_dir: Path) -> tuple[str, list[tuple[str, str, str]]]:
    from resunit.experiments import read_histories, summarize_degradation

    settings_path = run_dir / "experiment.json"
    settings = _read_json(settings_path) or {}
    histories = {k: v for k, v in read_histories(run_dir).items() if v}
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path)
    if summary is None and histories:
        summary = summarize_degradation(histories)  # an unfinished run: what is there so far
    title = f"Experiment: {settings.get('experiment', 'degradation')} on {settings.get('data')}"
    plot = run_dir / "degradation.png"
    if not plot.exists() and histories:
        plot = _regenerate(lambda p: _plots().plot_degradation(histories, p), plot)
    with _fields_of(settings_path):
        recipe = settings.get("recipe", {})
        config_html = _key_values({k: v for k, v in settings.items() if k != "recipe"})
        config_html += "<h3>Recipe shared by every network</h3>\n" + _key_values(recipe)
    if summary:
        with _fields_of(summary_path):
            rows = [
                (r["model"], r["depth"], r["epochs"], _percent(r["final_train_error"]),
                 _percent(r["final_test_error"]), _percent(r["best_test_error"]),
                 f"{r['seconds']:.0f}")
                for r in summary["networks"]
            ]  # fmt: skip
            verdict = html.escape(summary["verdict"])
        metrics_html = f"<p class='verdict'>{verdict}</p>\n" + _table(_DEGRADATION_HEADERS, rows)
    else:
        metrics_html = "<p class='note'>No network has finished an epoch yet.</p>"
    curves_html = (
        "<p>Training error (thin, dashed) and test error (bold) per epoch: plain networks "
        "left, residual networks right (He et al. 2015, Fig. 6).</p>\n"
        + _image(plot, "degradation: error per epoch")
    )
    sections = [
        ("configuration", "Configuration", config_html),
        ("curves", "Curves", curves_html),
        ("metrics", "Final metrics", metrics_html),
    ]
    inspect_parts = []
    for name in histories:
        checkpoint = run_dir / name / "last.pt"
        config = _read_checkpoint_config(checkpoint) or {"model": name}
        inspect_parts.append(f"<h3>{html.escape(name)}</h3>\n{_inspection(config, checkpoint)}")
    sections.append(("inspection", "Inspection", "\n".join(inspect_parts)))
    for name in histories:
        analysis_dir = run_dir / name / "analysis"
        if (analysis_dir / "analysis.json").is_file():
            sections += _analysis_sections(analysis_dir, name)
    if not any(key.startswith("lesion") for key, _, _ in sections):
        deepest = list(histories)[-1] if histories else "resnet56"
        sections += _analysis_sections(run_dir / deepest / "analysis", deepest)
    return title, sections


_DEGRADATION_HEADERS = ["model", "depth", "epochs", "train error", "test error",
                        "best test error", "seconds"]  # fmt: skip


def _read_checkpoint_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from resunit.checkpoint import read_checkpoint

    config = read_checkpoint(path).get("config")
    return dict(config) if isinstance(config, dict) else None


def _plots() -> Any:
    from resunit import plots

    return plots


def _regenerate(draw: Any, path: Path) -> Path | None:
    # A run without its PNG (matplotlib missing while it trained): draw it now if we can.
    # A directory we may not write to only loses the plot, not the whole report.
    try:
        return draw(path)
    except (ImportError, ConfigError):  # plots turn an OSError into a ConfigError
        return None


__all__ = ["build_report", "write_report"]
