"""Safe checkpoint reading and weight loading: never executes code from a file.

Every read goes through ``torch.load(weights_only=True)``, which refuses pickled code; every
write is atomic (temporary file, fsync, rename); every failure becomes a
:class:`~resunit.errors.CheckpointError` whose message says what is wrong with which file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
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
        inside = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
        hint = f" such as {' or '.join(inside)} in it" if inside else ""
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


# Why a LoadReport's head keys were not loaded.
_SHAPE_DIFFERS = "shape differs"
_MODEL_HEADLESS = "the model has none"
_CHECKPOINT_HEADLESS = "not in the checkpoint"


@dataclass
class LoadReport:
    """What :func:`load_weights` did: keys loaded and classifier-head keys not loaded.

    ``skipped_head`` holds the model's head keys left freshly initialised (the checkpoint's
    head has another number of classes, or it has none) or, when the model itself has no
    head (``num_classes=0``), the checkpoint's head keys that had nowhere to go;
    ``head_reason`` says which.
    """

    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    head_reason: str = _SHAPE_DIFFERS

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors"
        if self.skipped_head:
            kept = (
                "ignored the checkpoint's classifier head"
                if self.head_reason == _MODEL_HEADLESS
                else "kept a fresh classifier head"
            )
            text += f"; {kept} ({', '.join(self.skipped_head)}: {self.head_reason})"
        return text


def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    head_prefix: str = "fc.",
) -> LoadReport:
    """Load weights strictly, except a classifier head that does not fit.

    This is fine-tuning's usual first step: a 1000-class checkpoint into a 10-class model
    loads everything but ``fc`` and says so in the returned report. The head is also left
    out when only one side has one: a checkpoint's head is ignored by a model built without
    one (``num_classes=0``, features only), and a model keeps its fresh head when the
    checkpoint has none. Any other missing, unexpected or mis-shaped key is an error that
    lists the keys (another architecture).

    A model built on the ``meta`` device (no memory allocated) receives the checkpoint's
    tensors themselves, converted to its dtypes; a fresh head it keeps is initialised on the
    device the weights came from.
    """
    from_file = isinstance(source, (str, os.PathLike))
    state = extract_state_dict(read_checkpoint(source) if from_file else source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    skipped_head = [k for k in mismatched if k.startswith(head_prefix)]
    reason = _SHAPE_DIFFERS
    model_has_head = any(k.startswith(head_prefix) for k in own)
    checkpoint_has_head = any(k.startswith(head_prefix) for k in state)
    if not model_has_head and checkpoint_has_head:
        skipped_head = [k for k in unexpected if k.startswith(head_prefix)]
        unexpected = [k for k in unexpected if k not in skipped_head]
        reason = _MODEL_HEADLESS
    elif model_has_head and not checkpoint_has_head:
        skipped_head = [k for k in missing if k.startswith(head_prefix)]
        missing = [k for k in missing if k not in skipped_head]
        reason = _CHECKPOINT_HEADLESS
    problems = []
    if missing:
        problems.append(f"missing {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short_list(unexpected)}")
    bad = [k for k in mismatched if k not in skipped_head]
    if bad:
        problems.append(
            "shape mismatch "
            + _short_list([f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in bad])
        )
    if problems:
        raise CheckpointError("checkpoint does not fit this architecture: " + "; ".join(problems))
    to_load = {k: v for k, v in state.items() if k in own and k not in skipped_head}
    on_meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if on_meta:
        _assign_weights(model, own, to_load, copy=not from_file)
        _materialise_head(model, head_prefix, skipped_head)
        _check_nothing_meta(model)
    else:
        model.load_state_dict(to_load, strict=False)
    return LoadReport(loaded=sorted(to_load), skipped_head=skipped_head, head_reason=reason)


def _assign_weights(
    model: nn.Module, own: Mapping[str, Tensor], to_load: Mapping[str, Tensor], copy: bool
) -> None:
    # Copying into meta tensors is a silent no-op, so the model takes the tensors themselves
    # (assign=True). Each keeps the model's dtype, and its device unless that is meta, as a
    # copying load would; tensors the caller passed in are copied so that training the model
    # never changes the caller's dictionary (a copying load never shares them either).
    assigned = {}
    for key, value in to_load.items():
        target = own[key]
        device = value.device if target.is_meta else target.device
        assigned[key] = value.to(device=device, dtype=target.dtype, copy=copy)
    model.load_state_dict(assigned, strict=False, assign=True)


def _materialise_head(model: nn.Module, head_prefix: str, skipped_head: list[str]) -> None:
    # A head kept fresh is still meta: allocate it where the loaded weights are and initialise
    # it as the layer itself does (nn.Linear's reset_parameters is also how ResNet makes fc).
    name = head_prefix.rstrip(".")
    if not skipped_head or not name:
        return
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    try:
        head = model.get_submodule(name)
    except AttributeError:
        return  # _check_nothing_meta names what is left
    for module in head.modules():
        own_tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        reset = getattr(module, "reset_parameters", None)
        if any(t.is_meta for t in own_tensors) and callable(reset):
            module.to_empty(device=device, recurse=False)
            reset()


def _check_nothing_meta(model: nn.Module) -> None:
    left = [
        name
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if t.is_meta  # e.g. a non-persistent buffer: never in a state_dict
    ]
    if left:
        raise CheckpointError(
            f"the model was built on the meta device and {_short_list(sorted(left))} got no "
            "values from the checkpoint: build the model on a real device instead"
        )


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


# What feeding images to a checkpoint's model takes: its classes and channels, its input size
# and the normalisation it was trained with. `resunit train` records them all.
FEEDING_FIELDS = ("num_classes", "in_chans", "input_size", "mean", "std")


def require_config_fields(
    config: Mapping[str, Any], fields: Iterable[str], source: str = "the checkpoint"
) -> None:
    """Raise :class:`CheckpointError` naming every one of ``fields`` that ``config`` lacks."""
    missing = [name for name in fields if config.get(name) is None]
    if missing:
        raise CheckpointError(
            f"{source}: its config lacks {', '.join(missing)} (checkpoints written by "
            "`resunit train` record them)"
        )


def load_model(
    path: str | os.PathLike[str], needs: Iterable[str] = ()
) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild a trained model from a resunit checkpoint and load its weights safely.

    The checkpoint's ``config`` (model name, num_classes, in_chans, overrides, dataset,
    mean/std, classes, input size) says what to build. Returns (model in eval mode, config).
    ``needs`` names the config fields the caller will use (e.g. :data:`FEEDING_FIELDS`): a
    checkpoint without one is refused here, with its path.
    """
    payload = read_checkpoint(path)
    config = payload.get("config")
    if not isinstance(config, Mapping) or "model" not in config:
        raise CheckpointError(
            f"{path} has no resunit model config (was it written by `resunit train`?); build "
            "the model yourself and use resunit.checkpoint.load_weights"
        )
    config = dict(config)
    require_config_fields(config, needs, str(path))
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
            f"{path}: its weights do not hold the classifier of the "
            f"{config.get('num_classes')} classes its config names "
            f"({', '.join(report.skipped_head)}: {report.head_reason})"
        )
    return model.eval(), config


__all__ = [
    "FEEDING_FIELDS",
    "LoadReport",
    "extract_state_dict",
    "load_model",
    "load_weights",
    "read_checkpoint",
    "require_config_fields",
    "save_checkpoint",
]
