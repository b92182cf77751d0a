"""Training: the loop, its optimiser and schedule, and checkpoints — plain PyTorch.

The whole job in view: :func:`train` runs the epochs a :class:`~resunit.train_config.TrainConfig`
describes over in-memory uint8 tensors with batched augmentation, checkpoints ``last.pt`` and
``best.pt`` into the run directory (:mod:`resunit.run_dir` writes the rest) and resumes
bitwise-exactly from ``last.pt``; under torchrun every rank runs it (:mod:`resunit.distributed`).
All randomness of an epoch comes from a generator seeded by (seed, epoch) whose state is
checkpointed, so a resumed run replays exactly what the uninterrupted one would have done.
The config, the recipes and the distributed helpers are importable from here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.checkpoint import (
    FEEDING_FIELDS,
    load_model,
    read_checkpoint,
    require_config_fields,
    save_checkpoint,
)
from resunit.data import ImageDataset, augment, default_data_root, load_dataset
from resunit.distributed import (
    Distributed,
    agree_on_step,
    broadcast_buffers,
    setup_distributed,
    shard_indices,
    stop_requested,
)
from resunit.errors import CheckpointError, ConfigError, DatasetError, TrainingError
from resunit.evaluation import evaluate, prepare_batch, top1_agreement  # also from here
from resunit.models import create_model
from resunit.outputs import CHOOSE_ANOTHER_OUT, folders_removed_on_failure, prepare_output_dir
from resunit.run_dir import (
    RUN_FILES,
    RunWriter,
    check_run_dir,
    new_run_dir,
    read_metrics,
    run_files_removed_if_no_checkpoint,
)
from resunit.train_config import (
    DEFAULT_RECIPE,
    RECIPES,
    SCHEDULES,
    TrainConfig,
    make_config,
    validate_config,
)

CHECKPOINT_FORMAT = "resunit-train-1"


# --- optimiser and schedule ---------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only: decaying BN scales and biases only
    shrinks them without regularising anything (Goyal et al. 2017, §5.1 of arXiv:1812.01187)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,  # a run saved before the check
    )


def learning_rate(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate at iteration ``step`` (0-based): a pure function, so resuming is exact."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        # Linear up to the peak over 30% (or the warm-up), then cosine down to ~0 (Smith 2018).
        peak = warmup or max(1, round(0.3 * total_steps))
        if step < peak:
            return config.lr * (0.04 + 0.96 * step / peak)
        progress = (step - peak) / max(1, total_steps - peak)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "multistep":
        passed = sum(step >= round(m * total_steps) for m in config.milestones)
        return config.lr * config.gamma**passed
    return config.lr


# --- training -----------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The device a ``device`` setting names: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (CUDA
    when a GPU is available, else CPU). Raises :class:`ConfigError` for anything else and for
    CUDA on a machine without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA GPU is available")
    return device


# What a checkpoint needs to be resumed (``checkpoint_payload`` writes them all).
_RESUME_KEYS = (
    "config",
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "epoch_step",
    "best_score",
    "best_epoch",
    "data_rng",
    "torch_rng",
)


def global_step_of(state: dict[str, Any]) -> int:
    """The number of optimiser steps a resumable checkpoint has taken."""
    return int(state["scheduler"]["step"])


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class _InterruptFlag:
    """Turns the first Ctrl-C (SIGINT) into a flag checked between steps, so the state is
    never half-updated when we save; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def load_data(config: TrainConfig) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """(train, val or None, test) for a config; val is carved from train when asked."""
    options: dict[str, Any] = {**config.data_options, "val_fraction": config.val_fraction}
    train_set = load_dataset(config.data, "train", config.data_root, **options)
    val_set = (
        load_dataset(config.data, "val", config.data_root, **options)
        if config.val_fraction > 0
        else None
    )
    test_set = load_dataset(config.data, "test", config.data_root, **config.data_options)
    if test_set.classes != train_set.classes:
        raise DatasetError(
            f"{config.data}: the test split's classes ({_names(test_set.classes)}) are not the "
            f"training split's ({_names(train_set.classes)})"
        )
    # One normalisation for all splits: the training images' statistics, as at deployment.
    for other in (val_set, test_set):
        if other is not None:
            other.mean, other.std = train_set.mean, train_set.std
    return train_set, val_set, test_set


def load_run_data(
    config: dict[str, Any], split: str, data: str | None = None, root: str | None = None
) -> ImageDataset:
    """``split`` of the data a checkpoint's run trained on, as that run saw it: the same
    options, train/val partition, image size and normalisation. ``data``/``root`` point to
    another dataset or location, which must have the same classes and channels."""
    data = data or config.get("data") or config.get("dataset")
    if not data:
        raise DatasetError(
            "the checkpoint does not record its dataset: name one (data=, or --data)"
        )
    require_config_fields(config, FEEDING_FIELDS)
    # The run's own data root, only for the run's own dataset (not for --data another one).
    recorded = config.get("data_root") if data == config.get("data") else None
    recorded_root = root is None and recorded
    root = root or recorded
    options: dict[str, Any] = {}
    if data == config.get("data"):
        options = {**(config.get("data_options") or {}), "val_fraction": config.get("val_fraction")}
    if data == "imagefolder":  # images of the size and channels the model was trained on
        options.setdefault("image_size", (config.get("image_size") or [config["input_size"]])[0])
        options.setdefault("channels", config["in_chans"])
    try:
        dataset = load_dataset(data, split, root, **options)
    except DatasetError as exc:
        raise _moved_data(exc, root if recorded_root else None) from None
    if dataset.num_classes != config["num_classes"] or dataset.in_chans != config["in_chans"]:
        raise DatasetError(
            f"{data} has {dataset.num_classes} classes × {dataset.in_chans} channels but the "
            f"checkpoint expects {config['num_classes']} × {config['in_chans']}"
        )
    if config.get("classes") and list(dataset.classes) != list(config["classes"]):
        raise DatasetError(
            f"{data} has classes {_names(dataset.classes)} but the checkpoint was trained on "
            f"{_names(config['classes'])}"
        )
    # Normalise exactly as in training, whatever this dataset's own statistics are.
    dataset.mean, dataset.std = tuple(config["mean"]), tuple(config["std"])
    return dataset


def check_cutout(config: TrainConfig, train_set: ImageDataset) -> None:
    """Refuse a cutout larger than the training images, which would blank most of every one
    (checked once the data is loaded: only then is the images' size known)."""
    height, width = train_set.image_size
    if config.cutout > min(height, width):
        raise ConfigError(
            f"cutout {config.cutout} is larger than the {height}×{width} training images and "
            "would blank most of every one (cutout=, or --cutout; DeVries & Taylor used half "
            "the side)"
        )


def _moved_data(exc: DatasetError, recorded_root: str | None) -> DatasetError:
    """``exc`` again, saying how to point at the run's data when its recorded root is gone."""
    if not recorded_root or Path(recorded_root).exists():
        return exc
    # Runs recorded before 2026-11-29 hold the root as typed, relative to where they ran.
    where = "is gone" if Path(recorded_root).is_absolute() else "is relative to where it ran"
    return DatasetError(
        f"{exc} (the run's data root {recorded_root} {where}; give its place with data_root=, "
        "or --data-root)"
    )


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)})" if len(names) > limit else "")


def checkpoint_config(
    config: TrainConfig, train_set: ImageDataset, input_size: int
) -> dict[str, Any]:
    """The configuration a checkpoint carries: the recipe plus what ``load_model`` needs to
    rebuild the model and feed it (classes, channels, input size, normalisation)."""
    return {
        **config.to_dict(),
        "data_root": _recorded_data_root(config),
        "num_classes": train_set.num_classes,
        "in_chans": train_set.in_chans,
        "input_size": input_size,
        "image_size": list(train_set.image_size),
        "dataset": train_set.name,
        "classes": list(train_set.classes),
        "mean": list(train_set.mean),
        "std": list(train_set.std),
    }


def _recorded_data_root(config: TrainConfig) -> str | None:
    # Absolute (not resolved: a symlinked data folder stays the link), so that eval, analyze
    # and export find the data from any directory; a dataset's default root too.
    root = config.data_root or default_data_root(config.data)
    return str(Path(root).absolute()) if root else None


def train(
    config: TrainConfig | None,
    progress: bool = True,
    resume: str | os.PathLike[str] | None = None,
    *,
    data_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train ``config`` (or continue the run in directory ``resume``) and return a summary.

    The summary has ``run_dir``, ``epochs``, ``steps``, ``seconds``, ``images_per_second``,
    ``best_val_accuracy`` and ``interrupted`` (True when Ctrl-C stopped the run after saving
    a resumable checkpoint). A run that finished also has ``test_accuracy``, ``test_loss``
    and ``per_class_accuracy`` (of the final weights); an interrupted one is not tested.

    With ``resume``, the run continues with the options saved in its directory; ``config``
    may be None and is not used then (other options would break the exact continuation).
    Only ``data_root`` may be given with it: where the run's data is now, if it moved.

    ``config.threads`` (the digits recipe sets 1) holds only while training: torch's thread
    count is restored when this returns or raises, so a caller's later work is not left on
    one thread. ``threads=0`` keeps the caller's setting throughout.
    """
    if data_root is not None and resume is None:
        raise ConfigError("data_root= is for resume=; a new run takes config.data_root")
    with restore_torch_threads():
        return _train(config, progress, resume, data_root)


@contextlib.contextmanager
def restore_torch_threads() -> Iterator[None]:
    """Whatever the block does to torch's (process-wide) CPU thread count is undone when it
    ends, normally or by an exception: a recipe's ``threads`` holds only while it trains."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:  # setting it is not free
            torch.set_num_threads(threads)


def _train(
    config: TrainConfig | None,
    progress: bool,
    resume: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    state = None
    if resume is None and not isinstance(config, TrainConfig):
        raise ConfigError(
            f"train() needs a TrainConfig (from make_config) or resume=RUN_DIR, got {config!r}"
        )
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            what = "is a file" if run_dir.exists() else "does not exist"
            raise ConfigError(
                f"{run_dir} {what}: resume takes the run directory that holds last.pt"
            )
        state = read_checkpoint(run_dir / "last.pt")
        missing = [key for key in _RESUME_KEYS if key not in state]
        if state.get("format") != CHECKPOINT_FORMAT or missing:
            lacking = f" (it lacks {', '.join(missing)})" if missing else ""
            raise CheckpointError(
                f"{run_dir / 'last.pt'} is not a resumable resunit checkpoint{lacking}"
            )
        names = {f.name for f in fields(TrainConfig)}
        saved = {k: v for k, v in state["config"].items() if k in names}
        config = TrainConfig(**saved)
        config.out = str(run_dir)
        if data_root is not None:
            config.data_root = str(data_root)
    else:
        validate_config(config)
        run_dir = new_run_dir(config)
        if (run_dir / "last.pt").exists():
            raise ConfigError(
                f"{run_dir} already holds a run: continue it (resume=, or --resume {run_dir}) or "
                + CHOOSE_ANOTHER_OUT
            )
    check_run_dir(run_dir, config, resuming=state is not None)
    # Created (and write-tested) here, by every process before they group under torchrun, so
    # that a place that takes no files stops them all at once: were rank 0 alone to find out
    # later, the other ranks would wait for it in their first collective. A run that fails
    # removes the folders it made, where then empty (a TensorBoard log keeps them).
    with folders_removed_on_failure(run_dir):
        prepare_output_dir(run_dir)  # RUN_FILES as directories: refused just above
        with run_files_removed_if_no_checkpoint(run_dir):
            return _run(config, state, run_dir, progress)


@dataclass
class ResumePoint:
    """Where a run continues from: the defaults are a fresh run's start."""

    epoch: int = 0
    epoch_step: int = 0  # steps already taken in ``epoch`` (0: at its start)
    global_step: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    data_rng: Tensor | None = None  # the epoch's data generator state, when mid-epoch
    epoch_totals: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _resume_point(
    state: dict[str, Any],
    run_dir: Path,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: ImageDataset,
    total_steps: int,
    device: torch.device,
) -> ResumePoint:
    """Load ``last.pt``'s weights, optimiser and random state into the run, and say where it
    continues; a finished run, other data, another model or a damaged state is one line."""
    if global_step_of(state) >= total_steps:
        raise ConfigError(f"{run_dir} has finished its {total_steps} steps: nothing to resume")
    last = run_dir / "last.pt"
    trained_classes = state["config"].get("num_classes")
    if trained_classes != train_set.num_classes:
        raise CheckpointError(
            f"{last} no longer fits its data: the run was trained with {trained_classes} "
            f"classes and {config.data} now has {train_set.num_classes}"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[-1].strip() if str(exc).strip() else ""
        raise CheckpointError(
            f"{last} does not fit the {config.model} its config names ({first[:200]})"
        ) from None
    try:  # the rest was written by resunit itself; a damaged or crafted file gets one line
        optimizer.load_state_dict(state["optimizer"])
        epoch_step = int(state["epoch_step"])
        point = ResumePoint(
            epoch=int(state["epoch"]),
            epoch_step=epoch_step,
            global_step=global_step_of(state),
            best_score=float(state["best_score"]),
            best_epoch=int(state["best_epoch"]),
            data_rng=state["data_rng"] if epoch_step else None,
            epoch_totals=dict(state.get("epoch_totals") or {}),
            history=[dict(r) for r in state.get("history") or []],
        )
        if point.data_rng is not None:  # checked now, used at the start of its epoch
            torch.Generator().set_state(point.data_rng)
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{last} is not a resumable resunit checkpoint: its training state is damaged "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    return point


def _run(
    config: TrainConfig, state: dict[str, Any] | None, run_dir: Path, progress: bool
) -> dict[str, Any]:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dist_info = setup_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if state is not None and int(state.get("world_size", 1)) != dist_info.world_size:
        raise CheckpointError(
            f"{run_dir} was trained with {state.get('world_size', 1)} processes; resume it with "
            f"the same number (now {dist_info.world_size})"
        )

    try:
        train_set, val_set, test_set = load_data(config)
    except DatasetError as exc:
        raise _moved_data(exc, config.data_root if state is not None else None) from None
    check_cutout(config, train_set)
    torch.manual_seed(config.seed)
    model = create_model(
        config.model,
        num_classes=train_set.num_classes,
        in_chans=train_set.in_chans,
        **config.model_overrides,
    )
    input_size = config.input_size or train_set.image_size[0]
    model_config = {
        **checkpoint_config(config, train_set, input_size),
        "world_size": dist_info.world_size,
    }
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)

    n_local = len(train_set) // dist_info.world_size
    steps_per_epoch = max(1, n_local // config.batch_size)
    total_steps = config.steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    point = ResumePoint()  # a fresh run
    if state is not None:
        point = _resume_point(
            state, run_dir, config, model, optimizer, train_set, total_steps, device
        )
    start_epoch, epoch_step, global_step = point.epoch, point.epoch_step, point.global_step
    best_score, best_epoch = point.best_score, point.best_epoch
    data_rng_state, carried, history = point.data_rng, point.epoch_totals, point.history

    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        net = torch.compile(net)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    writer = RunWriter(run_dir, model_config, config, enabled=dist_info.is_main)
    if state is not None:
        writer.rewrite_metrics(history)
    images_all = train_set.images.to(device)
    labels_all = train_set.labels.to(device)
    run_start = time.perf_counter()
    images_seen = 0
    interrupted = False

    def checkpoint_payload(
        epoch: int, step_in_epoch: int, rng: torch.Generator, totals: dict[str, float]
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"schedule": config.schedule, "step": global_step},
            "epoch": epoch,
            "epoch_step": step_in_epoch,
            "data_rng": rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "epoch_totals": totals,
            "world_size": dist_info.world_size,
            "history": history,
            "config": model_config,
        }

    with _InterruptFlag() as interrupt:
        for epoch in range(start_epoch, epochs):
            rng = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
            order = shard_indices(len(train_set), rng, dist_info.rank, dist_info.world_size)
            first_step = 0
            if data_rng_state is not None:  # resuming mid-epoch: same order, same draws
                rng.set_state(data_rng_state)
                first_step, data_rng_state = epoch_step, None
            steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            totals = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
            if first_step:
                totals.update(carried)
            model.train()
            bar = _progress(
                steps_this_epoch, first_step, epoch, epochs, progress and dist_info.is_main
            )
            tick = time.perf_counter()
            for step in range(first_step, steps_this_epoch):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size].to(device)
                images = augment(
                    images_all[idx],
                    rng,
                    crop_padding=config.crop_padding,
                    flip=config.flip,
                    cutout_size=config.cutout,
                )
                labels = labels_all[idx]
                x = prepare_batch(
                    images, train_set.mean, train_set.std, input_size, config.channels_last
                )
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, global_step, total_steps, steps_per_epoch)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    logits = net(x)
                    loss = criterion(logits.float(), labels)
                loss_value = loss.item()
                finite, stop = agree_on_step(loss_value, interrupt.raised, dist_info, device)
                if not finite:
                    raise TrainingError(
                        _non_finite_message(loss_value, global_step + 1, epoch, run_dir)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                global_step += 1
                batch = len(labels)
                images_seen += batch * dist_info.world_size
                totals["loss"] += loss_value * batch
                totals["correct"] += float((logits.argmax(1) == labels).sum())
                totals["count"] += batch
                bar.update(1)
                if step % 5 == 0 or step + 1 == steps_this_epoch:
                    elapsed = totals["seconds"] + time.perf_counter() - tick
                    bar.set_postfix_str(
                        f"loss {totals['loss'] / totals['count']:.4f} "
                        f"acc {totals['correct'] / totals['count']:.2%} "
                        f"{totals['count'] * dist_info.world_size / max(elapsed, 1e-9):,.0f} img/s"
                    )
                # Alone, a Ctrl-C during this step counts now; under DDP, what the ranks agreed
                # on above (a Ctrl-C since then is seen at the next step).
                stop = stop if dist_info.enabled else interrupt.raised
                if stop and step + 1 < steps_this_epoch:
                    totals["seconds"] += time.perf_counter() - tick
                    bar.close()
                    if dist_info.enabled:
                        broadcast_buffers(model)
                    if dist_info.is_main:
                        save_checkpoint(
                            checkpoint_payload(epoch, step + 1, rng, totals), run_dir / "last.pt"
                        )
                    interrupted = True
                    break
            if interrupted:
                break
            bar.close()
            totals["seconds"] += time.perf_counter() - tick
            if dist_info.enabled:
                broadcast_buffers(model)
            images_per_second = (
                totals["count"] * dist_info.world_size / max(totals["seconds"], 1e-9)
            )
            record = {
                "epoch": epoch + 1,
                "step": global_step,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": totals["loss"] / max(totals["count"], 1),
                "train_accuracy": totals["correct"] / max(totals["count"], 1),
                "seconds": totals["seconds"],
                "images_per_second": images_per_second,
            }
            if val_set is not None:
                val = evaluate(
                    model,
                    val_set,
                    config.eval_batch_size,
                    input_size=input_size,
                    channels_last=config.channels_last,
                    bf16=config.bf16,
                )
                record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            # The test set never picks a checkpoint. With a validation split, best.pt is the
            # epoch that scores best on it. Without one, nothing held out can judge epochs, and
            # accuracy on augmented training batches is a poor judge (it favours mid-schedule
            # epochs over the final ones the schedule was built to end on), so best.pt simply
            # follows the latest weights.
            score = record.get("val_accuracy", record["train_accuracy"])
            is_best = score > best_score or val_set is None
            if is_best:
                best_score, best_epoch = score, epoch + 1
            if dist_info.is_main:
                history.append(record)
                # Checkpoint first: it carries the metrics history, so a crash before the
                # metrics line is written loses nothing (resume rewrites metrics.jsonl from it).
                payload = checkpoint_payload(epoch + 1, 0, rng, {})
                save_checkpoint(payload, run_dir / "last.pt")
                if is_best:
                    save_checkpoint(payload, run_dir / "best.pt")
                writer.log(record, final=epoch + 1 == epochs)
                if progress:
                    per_epoch = (time.perf_counter() - run_start) / (epoch + 1 - start_epoch)
                    writer.echo(record, epochs, per_epoch * (epochs - epoch - 1))
            if stop_requested(interrupt.raised, dist_info, device) and epoch + 1 < epochs:
                interrupted = True
                break

    if interrupted and dist_info.is_main:
        writer.plot()
    seconds = time.perf_counter() - run_start
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": config.model,
        "data": config.data,
        "epochs": epochs,
        "steps": global_step,
        "seconds": seconds,  # this session's wall time: after --resume, only the resumed part
        "images_per_second": images_seen / max(seconds, 1e-9),
        # Training time of every epoch in the run's history, those before a resume included.
        "training_seconds": sum(float(r["seconds"]) for r in history) if history else None,
        "interrupted": interrupted,
        "is_main": dist_info.is_main,
        "weights_sha256": weights_digest(model),
        "best_epoch": best_epoch,
        "best_val_accuracy": best_score if val_set is not None else None,
    }
    if not interrupted:
        test = evaluate(
            model,
            test_set,
            config.eval_batch_size,
            input_size=input_size,
            channels_last=config.channels_last,
            bf16=config.bf16,
        )
        summary.update(
            test_accuracy=test["accuracy"],
            test_loss=test["loss"],
            per_class_accuracy=test["per_class_accuracy"],
        )
        if dist_info.is_main:
            writer.finish(summary)
    writer.close()
    return summary


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor in the state_dict: equal digests mean bitwise-equal models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


# What to try after a diverged loss, for library and CLI users alike.
LOWER_LR_HINT = "try a lower learning rate: lr=, or --lr"


def _non_finite_message(loss: float, step: int, epoch: int, run_dir: Path) -> str:
    whose = f"loss became {loss}" if not math.isfinite(loss) else "another rank's loss diverged"
    where = f"{whose} at step {step} (epoch {epoch + 1}); training stopped"
    if (run_dir / "last.pt").exists():
        return f"{where}, last good checkpoint kept in {run_dir / 'last.pt'} ({LOWER_LR_HINT})"
    return f"{where} before its first checkpoint ({LOWER_LR_HINT})"


def _progress(total: int, initial: int, epoch: int, epochs: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="step",
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )


@torch.no_grad()
def predict_files(
    checkpoint: str | os.PathLike[str], paths: list[str], top_k: int = 3, invert: bool = False
) -> list[dict[str, Any]]:
    """Top-k class names and probabilities for image files, converted and resized to the
    channels and size the checkpoint's model was trained on.

    ``invert`` flips brightness first (255 − value): for dark ink on light paper when the
    model learnt light strokes on a dark ground, as the digits data has them.
    """
    from resunit.data import read_image

    model, config = load_model(checkpoint, needs=(*FEEDING_FIELDS, "classes"))
    height, width = config.get("image_size") or (config["input_size"],) * 2
    images = torch.stack([read_image(p, config["in_chans"], (height, width)) for p in paths])
    if invert:
        images = 255 - images
    x = prepare_batch(images, tuple(config["mean"]), tuple(config["std"]), config["input_size"])
    probabilities = model(x).softmax(1)
    k = max(1, min(top_k, probabilities.shape[1]))
    top = probabilities.topk(k, dim=1)
    classes = config["classes"]
    return [
        {
            "image": str(path),
            "classes": [classes[i] for i in top.indices[n].tolist()],
            "indices": top.indices[n].tolist(),
            "probabilities": top.values[n].tolist(),
        }
        for n, path in enumerate(paths)
    ]


__all__ = [
    "DEFAULT_RECIPE",
    "LOWER_LR_HINT",
    "RECIPES",
    "RUN_FILES",
    "SCHEDULES",
    "Distributed",
    "ResumePoint",
    "TrainConfig",
    "check_cutout",
    "checkpoint_config",
    "evaluate",
    "global_step_of",
    "learning_rate",
    "load_data",
    "load_run_data",
    "make_config",
    "make_optimizer",
    "predict_files",
    "prepare_batch",
    "read_metrics",
    "resolve_device",
    "restore_torch_threads",
    "setup_distributed",
    "shard_indices",
    "top1_agreement",
    "train",
    "validate_config",
    "weights_digest",
]
