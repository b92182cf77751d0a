"""Safe checkpoint reading and weight loading: never executes code from a file.

Every read goes through ``torch.load(weights_only=True)``, which refuses pickled code; every
write is atomic (temporary file, fsync, rename); every failure becomes a
:class:`~resunit.errors.CheckpointError` whose message says what is wrong with which file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resunit.atomic import atomic_path
from resunit.errors import CheckpointError, ResunitError
from resunit.models import ResNet, create_model

# Names under which common checkpoint formats keep the model's weights.
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "model_state")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file as plain tensors and containers; code in it is refused."""
    path = Path(path)
    if path.is_dir():
        hint = " such as best.pt or last.pt in it" if (path / "best.pt").is_file() else ""
        raise CheckpointError(f"{path} is a directory: give a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # A damaged header reads as an odd pickle protocol; the error below says more.
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        text = str(exc)
        # Code in a pickle shows up as a global (a function or class) the safe unpickler will
        # not import; anything else it trips over is damage, not an attack.
        if "Unsupported global" in text or "GLOBAL" in text or "Unsupported class" in text:
            raise CheckpointError(
                f"{path} contains Python objects that are not plain weights; refusing to load it "
                "(loading would execute code from the file)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_reason(exc)}"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary"
        )
    return dict(payload)


def _reason(exc: Exception) -> str:
    """The first sentence of torch's error that says what is wrong, without its advice to
    retry with ``weights_only=False`` (which would run any code in the file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unpickler = [line for line in lines if line.startswith("WeightsUnpickler error")]
    useful = unpickler or [line for line in lines if "weights_only" not in line]
    useful = [line for line in useful if "trust" not in line]
    if not useful:
        return type(exc).__name__
    sentence = useful[0].split(". ")[0].rstrip(".")
    if len(sentence.split()) < 3:  # a bare offset or key says nothing without its kind
        sentence = f"{type(exc).__name__} {sentence}"
    return sentence[:160]


def extract_state_dict(payload: Mapping[str, Any]) -> dict[str, Tensor]:
    """The model weights inside a checkpoint payload (a bare state_dict or a wrapped one).

    Strips the ``module.`` prefix that DistributedDataParallel adds to every key.
    """
    for key in _STATE_DICT_KEYS:
        if isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    if not payload or not all(isinstance(v, Tensor) for v in payload.values()):
        raise CheckpointError("no model weights found in the checkpoint")
    state = dict(payload)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


@dataclass
class LoadReport:
    """What :func:`load_weights` did: keys loaded and head keys left freshly initialised."""

    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.skipped_head:
            text += (
                f"; kept a fresh classifier head ({', '.join(self.skipped_head)}: shape differs)"
            )
        return text


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    head_prefix: str = "fc.",
) -> LoadReport:
    """Load weights strictly, except a classifier head whose number of classes differs.

    This is fine-tuning's usual first step: a 1000-class checkpoint into a 10-class model
    loads everything but ``fc`` and says so in the returned report. Any other missing,
    unexpected or mis-shaped key is an error that lists the keys (another architecture).
    """
    state = extract_state_dict(
        read_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    )
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    skipped_head = [k for k in mismatched if k.startswith(head_prefix)]
    problems = []
    if missing:
        problems.append(f"missing {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short_list(unexpected)}")
    if len(skipped_head) < len(mismatched):
        bad = [k for k in mismatched if k not in skipped_head]
        problems.append(
            "shape mismatch "
            + _short_list([f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in bad])
        )
    if problems:
        raise CheckpointError("checkpoint does not fit this architecture: " + "; ".join(problems))
    to_load = {k: v for k, v in state.items() if k not in skipped_head}
    model.load_state_dict(to_load, strict=False)
    return LoadReport(loaded=sorted(to_load), skipped_head=skipped_head)


def _short_list(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --- atomic writing and rebuilding a trained model ------------------------------------------


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` with ``torch.save`` atomically (see :func:`resunit.atomic.atomic_path`).

    A crash at any moment leaves either the previous file or the new one, never half of one.
    """
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return Path(path)


def load_model(path: str | os.PathLike[str]) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild a trained model from a resunit checkpoint and load its weights safely.

    The checkpoint's ``config`` (model name, num_classes, in_chans, overrides, dataset,
    mean/std, classes, input size) says what to build. Returns (model in eval mode, config).
    """
    payload = read_checkpoint(path)
    config = payload.get("config")
    if not isinstance(config, Mapping) or "model" not in config:
        raise CheckpointError(
            f"{path} has no resunit model config (was it written by `resunit train`?); build "
            "the model yourself and use resunit.checkpoint.load_weights"
        )
    config = dict(config)
    try:
        model = create_model(
            config["model"],
            num_classes=config.get("num_classes"),
            in_chans=config.get("in_chans"),
            **dict(config.get("model_overrides") or {}),
        )
    except ResunitError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its model: {exc}") from None
    try:
        report = load_weights(model, payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if report.skipped_head:  # tolerated when fine-tuning; here the head must be the trained one
        raise CheckpointError(
            f"{path}: its classifier ({', '.join(report.skipped_head)}) does not have the "
            f"{config.get('num_classes')} classes its config names"
        )
    return model.eval(), config
