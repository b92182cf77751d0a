"""A training run's directory: what it holds (:data:`RUN_FILES`), the checks before training
that it can hold them and holds no other run, and :class:`RunWriter`, which fills it as the
run goes (config, metrics, curves, TensorBoard, summary). Checkpoints are the loop's own.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resunit.errors import ConfigError
from resunit.outputs import (
    CHOOSE_ANOTHER_OUT,
    check_output_location,
    json_text,
    read_jsonl,
    refuse_directories_where_files_go,
    write_json,
    write_jsonl,
)
from resunit.train_config import TrainConfig


def new_run_dir(config: TrainConfig) -> Path:
    if config.out:
        return Path(config.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.data}-{config.model}-{stamp}"


# What a run writes into its directory (see RunWriter and the checkpoints in _run).
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json")
# What a run writes before its first checkpoint; without one they describe no run.
BEFORE_CHECKPOINT = ("config.json", "metrics.jsonl", "curves.png")


def check_run_dir(run_dir: Path, config: TrainConfig, resuming: bool) -> None:
    """Refuse, before any work and without creating anything, a run directory whose files
    could never be written, or one that holds an experiment (both write ``summary.json``)."""
    check_output_location(run_dir, "--out", kind="directory")
    if (run_dir / "experiment.json").exists():
        what = "it cannot be resumed as a training run" if resuming else CHOOSE_ANOTHER_OUT
        raise ConfigError(
            f"{run_dir} holds an experiment (experiment.json, from `resunit experiment`): {what}"
        )
    # A run's first files without its checkpoint: another run's, which a new one would
    # overwrite (and the cleanup of a failed start, below, delete).
    leftovers = [name for name in BEFORE_CHECKPOINT if (run_dir / name).is_file()]
    if leftovers and not resuming:
        raise ConfigError(
            f"{run_dir} holds {', '.join(leftovers)} of another run: "
            f"remove them or {CHOOSE_ANOTHER_OUT}"
        )
    fix = "remove it to resume" if resuming else f"remove it or {CHOOSE_ANOTHER_OUT}"
    refuse_directories_where_files_go((run_dir / name for name in RUN_FILES), "the run", fix)
    board = run_dir / "tensorboard"
    if config.tensorboard and board.exists() and not board.is_dir():
        raise ConfigError(f"{board} is a file where --tensorboard writes its logs; {fix}")


@contextlib.contextmanager
def run_files_removed_if_no_checkpoint(run_dir: Path) -> Iterator[None]:
    """A run that fails before its first checkpoint (bad data, a loss gone to NaN in the first
    epoch) removes the files it began with, which `report` would show as a run that never
    was. They can only be this run's: a new run refuses a directory that already holds them."""
    try:
        yield
    except BaseException:
        # Only the main process writes them; under torchrun another rank's failure must not
        # delete what rank 0 has written while it goes on to its first checkpoint.
        is_main = int(os.environ.get("RANK", "0")) == 0
        if is_main and not (run_dir / "last.pt").exists():
            for name in BEFORE_CHECKPOINT:
                with contextlib.suppress(OSError):
                    (run_dir / name).unlink()
        raise


def tensorboard_writer_class() -> Any:
    # Checked before the run directory is created, so the error leaves nothing behind.
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # asked for by name: say so rather than log nothing
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class RunWriter:
    """The run directory's files: config.json, metrics.jsonl, curves.png, TensorBoard."""

    def __init__(
        self, run_dir: Path, model_config: dict[str, Any], config: TrainConfig, enabled: bool
    ) -> None:
        self.run_dir, self.enabled, self.tb = run_dir, enabled, None
        self.last_plot = -math.inf
        if not enabled:
            return
        summary_writer = tensorboard_writer_class() if config.tensorboard else None
        write_json(run_dir / "config.json", model_config)
        if summary_writer is not None:
            self.tb = summary_writer(str(run_dir / "tensorboard"))

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """On resume: metrics.jsonl becomes exactly the checkpoint's epochs (a crash may have
        come after a metrics line and before its checkpoint, or the other way round)."""
        if not self.enabled:
            return
        write_jsonl(self.run_dir / "metrics.jsonl", history)

    def log(self, record: dict[str, Any], final: bool = False) -> None:
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json_text(record) + "\n")
            f.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()
        # Redrawing costs ~0.1 s: at the end, and at most twice a minute along the way.
        if final or time.monotonic() - self.last_plot > 30:
            self.plot()

    def plot(self) -> None:
        try:
            from resunit.plots import plot_training_curves
        except ImportError:  # matplotlib is optional ([plot] extra)
            return
        with contextlib.suppress(ImportError):
            plot_training_curves(read_metrics(self.run_dir), self.run_dir / "curves.png")
        self.last_plot = time.monotonic()

    def echo(self, record: dict[str, Any], epochs: int, eta_seconds: float) -> None:
        from tqdm import tqdm

        text = (
            f"epoch {record['epoch']:>3}/{epochs}  loss {record['train_loss']:.4f}  "
            f"acc {record['train_accuracy']:.2%}  lr {record['lr']:.4g}  "
            f"{record['images_per_second']:,.0f} img/s"
        )
        if "val_accuracy" in record:
            text += f"  val acc {record['val_accuracy']:.2%}"
        if record["epoch"] < epochs:
            text += f"  ETA {int(eta_seconds) // 60}:{int(eta_seconds) % 60:02d}"
        tqdm.write(text)

    def finish(self, summary: dict[str, Any]) -> None:
        write_json(self.run_dir / "summary.json", summary)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records of a run (``metrics.jsonl``); [] before the first epoch."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


__all__ = [
    "BEFORE_CHECKPOINT",
    "RUN_FILES",
    "RunWriter",
    "check_run_dir",
    "new_run_dir",
    "read_metrics",
    "run_files_removed_if_no_checkpoint",
    "tensorboard_writer_class",
]
