"""Experiment runners built from train + analysis: the degradation experiment (He et al. 2015).

:func:`run_degradation` trains plain and residual networks of several depths with one
identical recipe and records training and test error after every epoch, the data of the
paper's Fig. 6. Every network has its own directory holding ``history.jsonl`` and a resumable
``last.pt`` (also loadable by ``resunit analyze``); running the same experiment again skips
finished networks and continues an interrupted one from its last finished epoch.

The loop is the one of :mod:`resunit.train` (same optimiser, schedule, augmentation and batch
preparation, imported from there), plus a test evaluation after each epoch: ``train()``
deliberately never looks at the test set during training, but Fig. 6 plots exactly that.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resunit.checkpoint import read_checkpoint, save_checkpoint
from resunit.data import ImageDataset, augment, load_dataset
from resunit.errors import CheckpointError, ConfigError
from resunit.evaluation import evaluate, prepare_batch
from resunit.models import create_model, list_models
from resunit.outputs import (
    CHOOSE_ANOTHER_OUT,
    check_output_location,
    read_jsonl,
    refuse_directories_where_files_go,
    write_json,
    write_jsonl,
)
from resunit.train import (
    LOWER_LR_HINT,
    check_cutout,
    checkpoint_config,
    learning_rate,
    make_optimizer,
    resolve_device,
    restore_torch_threads,
)
from resunit.train_config import TrainConfig, make_config

DEGRADATION_FORMAT = "resunit-degradation-1"
# Differences in final training error below half a percentage point (7 of the 1,437 digits)
# are within run-to-run noise; the verdict calls them "about the same".
DEGRADATION_MARGIN = 0.005


@dataclass
class DegradationConfig:
    """What the degradation experiment trains: ``plain{d}`` and ``resnet{d}`` for each depth,
    all with the same training recipe (``recipe`` plus ``train_options``) and seed."""

    depths: list[int] = field(default_factory=lambda: [20, 56])
    data: str = "digits"
    data_root: str | None = None
    recipe: str | None = None  # default: the data's own recipe (``fast`` for digits)
    epochs: int | None = None  # default: the recipe's
    # Two epochs of linear warm-up: He et al. 2015 (§4.2) warm ResNet-110 up at a lower rate
    # because 0.1 was too large to start converging; at the `fast` recipe's 30 epochs on the
    # digits, resnet56 without warm-up still has 20% training error at the end.
    warmup_epochs: float = 2.0
    seed: int = 0
    device: str = "auto"
    out: str = "runs/degradation"
    train_options: dict[str, Any] = field(default_factory=dict)

    def model_names(self) -> list[str]:
        """The networks in training order: shallow to deep, plain before residual."""
        if not self.depths:
            raise ConfigError("give at least one depth (depths=, or --depths 20 56)")
        repeated = sorted({d for d in self.depths if list(self.depths).count(d) > 1})
        if repeated:
            raise ConfigError(f"depth {repeated[0]} is given twice: each depth trains once")
        available = set(list_models())
        names = []
        for depth in sorted(set(self.depths)):
            pair = [f"plain{depth}", f"resnet{depth}"]
            if not all(name in available for name in pair):
                plain = sorted(int(n[5:]) for n in available if n.startswith("plain"))
                raise ConfigError(
                    f"depth {depth} has no plain/residual pair: choose depths from "
                    f"{', '.join(map(str, plain))}"
                )
            names += pair
        return names

    def train_config(self) -> TrainConfig:
        """The one recipe every network of the experiment is trained with."""
        options = {**self.train_options, "data": self.data, "data_root": self.data_root,
                   "epochs": self.epochs, "seed": self.seed, "device": self.device,
                   "warmup_epochs": self.warmup_epochs}  # fmt: skip
        return make_config(self.recipe, **options)


def recipe_settings(recipe: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters shared by every network (the model name is not one of them)."""
    skip = {"model", "out", "model_overrides", "tensorboard"}
    return {k: v for k, v in recipe.to_dict().items() if k not in skip and v is not None}


def run_degradation(
    config: DegradationConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every network of ``config`` (resuming what is already in ``config.out``), plot
    ``degradation.png`` and return (and write to ``summary.json``) the summary.

    Options, output locations, device and data are all checked before anything is written:
    ``experiment.json`` marks the directory as this experiment's, so writing it for a run that
    then fails would refuse the corrected rerun as "other settings".
    """
    out = Path(config.out)
    names = config.model_names()
    recipe = config.train_config()
    settings = {"experiment": "degradation", **asdict(config), "recipe": recipe_settings(recipe)}
    # Where it is written and what it runs on do not change the experiment; a resume may differ.
    settings.pop("out")
    settings.pop("device")
    settings["recipe"].pop("device")
    _check_locations(out, names)
    _check_same_experiment(out, settings)
    resolve_device(recipe.device)
    train_set = load_dataset(recipe.data, "train", recipe.data_root)
    test_set = load_dataset(recipe.data, "test", recipe.data_root)
    check_cutout(recipe, train_set)
    write_json(out / "experiment.json", settings)

    start = time.perf_counter()
    histories = {}
    with restore_torch_threads():
        if recipe.threads:
            torch.set_num_threads(recipe.threads)  # as resunit.train does for the same recipe
        for name in names:
            histories[name] = train_network(name, recipe, train_set, test_set, out / name,
                                            progress=progress, log=log)  # fmt: skip
    summary = summarize_degradation(histories, recipe)
    summary["seconds_this_session"] = time.perf_counter() - start
    summary["seconds_training"] = sum(h[-1]["elapsed_seconds"] for h in histories.values())
    write_json(out / "summary.json", summary)
    plot = out / "degradation.png"
    try:
        from resunit.plots import plot_degradation

        plot_degradation(histories, plot)
    except ImportError:  # matplotlib is optional ([plot] extra)
        log("matplotlib not installed: skipped degradation.png (pip install 'resunit[plot]')")
    return summary


def _check_locations(out: Path, names: Sequence[str]) -> None:
    """Refuse, before any training, an ``--out`` whose files could never be written: ``out``
    or a network's directory being a file, or one of the result files being a directory."""
    check_output_location(out, "--out", kind="directory")
    if (out / "config.json").exists():  # both write summary.json
        raise ConfigError(
            f"{out} holds a training run (config.json, from `resunit train`): " + CHOOSE_ANOTHER_OUT
        )
    files = [out / "experiment.json", out / "summary.json", out / "degradation.png"]
    for name in names:
        run_dir = out / name
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(
                f"{run_dir} is a file where {name} keeps its checkpoints; remove it or "
                + CHOOSE_ANOTHER_OUT
            )
        files += [run_dir / "last.pt", run_dir / "history.jsonl"]
    refuse_directories_where_files_go(files, "the experiment", f"remove it or {CHOOSE_ANOTHER_OUT}")


def _check_same_experiment(out: Path, settings: dict[str, Any]) -> None:
    # Resuming into a directory trained with another recipe would mix two experiments.
    path = out / "experiment.json"
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8 text
        previous = None
    if not isinstance(previous, dict):
        raise ConfigError(
            f"{path} is damaged (not a JSON object): remove it to resume the experiment there "
            f"with the options given now, or {CHOOSE_ANOTHER_OUT}"
        )
    settings = json.loads(json.dumps(settings))  # as it was stored: tuples become lists
    if previous != settings:
        changed = _changed_settings(previous, settings)
        raise ConfigError(
            f"{out} holds a degradation experiment with other settings ({', '.join(changed)}): "
            f"rerun it with the same options to resume, or {CHOOSE_ANOTHER_OUT}"
        )


def _changed_settings(previous: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The names of the settings that differ, as the user set them (``lr``, not
    ``train_options``); a recipe entry (``recipe.momentum``) only when no option already
    names the change (``--epochs`` sets both ``epochs`` and the recipe's)."""

    def as_given(settings: dict[str, Any]) -> dict[str, Any]:
        given = {k: v for k, v in settings.items() if k not in ("recipe", "train_options")}
        options = settings.get("train_options")
        return {**given, **options} if isinstance(options, dict) else given

    old, new = as_given(previous), as_given(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    old_recipe, new_recipe = previous.get("recipe"), now.get("recipe")
    if old_recipe == new_recipe:
        return changed
    if not isinstance(old_recipe, dict) or not isinstance(new_recipe, dict):
        return [*changed, "recipe"]
    return changed + sorted(
        f"recipe.{k}"
        for k in old_recipe.keys() | new_recipe.keys()
        if old_recipe.get(k) != new_recipe.get(k) and k not in changed
    )


def train_network(
    name: str,
    recipe: TrainConfig,
    train_set: ImageDataset,
    test_set: ImageDataset,
    run_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Train ``name`` with ``recipe``, evaluating train and test error after every epoch.

    Resumes from ``run_dir/last.pt``; returns the per-epoch history (also ``history.jsonl``).
    """
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)  # every network starts from the same seed
    model = create_model(name, num_classes=train_set.num_classes, in_chans=train_set.in_chans)
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    input_size = recipe.input_size or train_set.image_size[0]
    steps_per_epoch = max(1, len(train_set) // recipe.batch_size)
    total_steps = recipe.steps or recipe.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    model_config = {**checkpoint_config(recipe, train_set, input_size), "model": name}

    history: list[dict[str, Any]] = []
    checkpoint = run_dir / "last.pt"
    if checkpoint.exists():
        state = read_checkpoint(checkpoint)
        if state.get("format") != DEGRADATION_FORMAT:
            raise CheckpointError(f"{checkpoint} is not a degradation-experiment checkpoint")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
    if len(history) >= epochs:
        log(f"{name}: trained earlier ({epochs} epochs), skipped")
        return history

    images_all = train_set.images.to(device)
    labels_all = train_set.labels.to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    elapsed = history[-1]["elapsed_seconds"] if history else 0.0
    for epoch in range(len(history), epochs):
        tick = time.perf_counter()
        # Same per-epoch seeding as resunit.train, so resuming replays the same batches.
        rng = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
        order = torch.randperm(len(train_set), generator=rng)
        model.train()
        wrong, seen, loss_sum = 0, 0, 0.0
        for step in range(min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size].to(device)
            images = augment(images_all[idx], rng, crop_padding=recipe.crop_padding,
                             flip=recipe.flip, cutout_size=recipe.cutout)  # fmt: skip
            labels = labels_all[idx]
            x = prepare_batch(images, train_set.mean, train_set.std, input_size)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch * steps_per_epoch + step, total_steps,
                                            steps_per_epoch)  # fmt: skip
            logits = model(x)
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Training error as the paper plots it: over the epoch's augmented mini-batches.
            wrong += int((logits.argmax(1) != labels).sum())
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
        test = evaluate(model, test_set, recipe.eval_batch_size, input_size=input_size)
        elapsed += time.perf_counter() - tick
        record = {
            "epoch": epoch + 1,
            "train_error": wrong / max(seen, 1),
            "train_loss": loss_sum / max(seen, 1),
            "test_error": 1.0 - test["accuracy"],
            "test_loss": test["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_seconds": elapsed,
        }
        if not math.isfinite(record["train_loss"]):
            raise ConfigError(
                f"{name}: loss became {record['train_loss']} in epoch {epoch + 1}; {LOWER_LR_HINT}"
            )
        history.append(record)
        if epoch + 1 == epochs:
            # The final training error without augmentation, in eval mode: what the verdict
            # compares (the per-epoch running error above mixes weights of the whole epoch).
            clean = evaluate(model, train_set, recipe.eval_batch_size, input_size=input_size)
            record["final_train_error"] = 1.0 - clean["accuracy"]
        save_checkpoint(
            {"format": DEGRADATION_FORMAT, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "history": history, "config": model_config},
            checkpoint,
        )  # fmt: skip
        write_jsonl(run_dir / "history.jsonl", history)
        if progress:
            log(f"{name:>9}  epoch {epoch + 1:>3}/{epochs}  train err "
                f"{record['train_error']:6.2%}  test err {record['test_error']:6.2%}  "
                f"({elapsed:.0f} s)")  # fmt: skip
    return history


# What the summary, the verdict and the plot read from every epoch's record.
_HISTORY_FIELDS = ("epoch", "train_error", "test_error", "elapsed_seconds")


def read_histories(out: str | os.PathLike[str]) -> dict[str, list[dict[str, Any]]]:
    """The per-epoch histories of an experiment directory, by model name.

    A damaged ``history.jsonl`` (not JSON, or a record without the errors per epoch) is a
    :class:`ConfigError` naming the file and the line.
    """
    out = Path(out)
    histories = {}
    for path in sorted(out.glob("*/history.jsonl")):
        histories[path.parent.name] = read_jsonl(path, numbers=_HISTORY_FIELDS)
    return histories


def summarize_degradation(
    histories: dict[str, Sequence[dict[str, Any]]], recipe: TrainConfig | None = None
) -> dict[str, Any]:
    """One row per network (final train/test error, best test error) and a verdict computed
    from those numbers: does the deeper plain net train worse, and the deeper residual not?"""
    rows = []
    for name, history in histories.items():
        last = history[-1]
        rows.append(
            {
                "model": name,
                "family": "plain" if name.startswith("plain") else "residual",
                "depth": int(name.removeprefix("plain").removeprefix("resnet")),
                "epochs": last["epoch"],
                "final_train_error": last.get("final_train_error", last["train_error"]),
                "last_epoch_train_error": last["train_error"],
                "final_test_error": last["test_error"],
                "best_test_error": min(h["test_error"] for h in history),
                "seconds": last["elapsed_seconds"],
            }
        )
    rows.sort(key=lambda r: (r["depth"], r["family"]))
    summary: dict[str, Any] = {"networks": rows, "verdict": degradation_verdict(rows)}
    if recipe is not None:
        summary["recipe"] = recipe_settings(recipe)
    return summary


def degradation_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """A sentence stating what the numbers show (never a fixed conclusion)."""
    by = {(r["family"], r["depth"]): r for r in rows}
    depths = sorted({r["depth"] for r in rows})
    if len(depths) < 2:
        return "one depth only: train at least two depths to see whether deeper trains worse"
    shallow, deep = depths[0], depths[-1]

    def compare(family: str) -> tuple[str, float, float]:
        a = by[(family, shallow)]["final_train_error"]
        b = by[(family, deep)]["final_train_error"]
        if b > a + DEGRADATION_MARGIN:
            return "worse", a, b
        if b < a - DEGRADATION_MARGIN:
            return "better", a, b
        return "about the same", a, b

    plain, p_a, p_b = compare("plain")
    residual, r_a, r_b = compare("residual")
    numbers = (
        f"Final training error: plain{shallow} {p_a:.2%} → plain{deep} {p_b:.2%}; "
        f"resnet{shallow} {r_a:.2%} → resnet{deep} {r_b:.2%}."
    )
    as_well = {"better": "better than", "about the same": "about as well as", "worse": "worse than"}
    if plain == "worse" and residual != "worse":
        head = (
            f"Degradation reproduced: plain{deep} trains worse than plain{shallow}, while "
            f"resnet{deep} does not (it trains {as_well[residual]} resnet{shallow})."
        )
    elif plain == "worse":
        head = (
            "Both deeper nets train worse than their shallower versions on this run: the "
            "residual net does not escape degradation here."
        )
    elif residual == "worse":
        head = (
            f"Not reproduced: resnet{deep} trains worse than resnet{shallow} here, while "
            f"plain{deep} trains {as_well[plain]} plain{shallow}."
        )
    else:
        head = f"No degradation on this run: plain{deep} trains {as_well[plain]} plain{shallow}" + (
            " (more depth or fewer epochs may show it)." if plain == "about the same" else "."
        )
    plain_deep, residual_deep = by[("plain", deep)], by[("residual", deep)]
    depth_note = (
        f" At depth {deep} the residual net ends at {r_b:.2%} training error and "
        f"{residual_deep['final_test_error']:.2%} test error, the plain one at {p_b:.2%} and "
        f"{plain_deep['final_test_error']:.2%}."
        if "final_test_error" in plain_deep and "final_test_error" in residual_deep
        else ""
    )
    return f"{head} {numbers}{depth_note}"


__all__ = [
    "DegradationConfig",
    "degradation_verdict",
    "read_histories",
    "recipe_settings",
    "run_degradation",
    "summarize_degradation",
    "train_network",
]
