"""Measure what residual units do: shapes, parameters, MACs, residual ratios, lesions, gradients.

Every function takes a model (and, where it needs them, real batches) and returns plain data
(dicts and lists of numbers) that the CLI prints as a table or JSON and ``plots`` draws:

* :func:`inspect_model` — one row per unit: shapes, which shortcut and why, parameters and
  multiply-accumulates (MACs) of its residual branch and of its shortcut, plus totals;
* :func:`inspect_unit` — the same for one unit, layer by layer;
* :func:`residual_ratios` — ‖F(x)‖/‖x‖ and the spread of F(x) per unit (He et al. 2015, Fig. 7);
* :func:`lesion_study` — accuracy with each unit's residual branch removed (Veit et al. 2016);
* :func:`gradient_flow` — gradient norm per layer at initialisation, residual vs plain.

MACs come from PyTorch's own ``torch.utils.flop_counter`` (FLOPs ÷ 2), never hand-written
formulas; it counts convolutions and matrix products only, which is what torchvision's table
of GFLOPS (really GMACs) counts too. :func:`count_multiply_adds` is the one whole-model
counter (``resunit.deploy`` and the benchmarks use it as well).

Every function that switches a model to eval or train mode puts each module's own flag back
afterwards (also when an error interrupts it), and :func:`gradient_flow` seeds its models
without moving torch's global random state.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from resunit.blocks import (
    ResidualUnit,
    describe_shortcut,
    normalize_shortcut_kind,
)
from resunit.errors import ConfigError
from resunit.models import (
    ResNet,
    count_parameters,
    create_model,
    dtype_and_device,
    get_model_spec,
    list_models,
    resolve_block,
)
from resunit.outputs import prepare_output_dir, write_json
from resunit.validation import did_you_mean, require_int

# --- counting -----------------------------------------------------------------------------


def count_macs(fn: Any, *args: Any) -> int:
    """Multiply-accumulates of ``fn(*args)`` as PyTorch's flop counter sees them (FLOPs ÷ 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_multiply_adds(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one eval-mode forward pass of ``model`` on one ``C×H×W`` image.

    Counted by :func:`count_macs`: convolutions and matrix products (the classifier), which
    is what a ResNet spends its time on (BN, ReLU, additions and pooling are well under 1% of
    the arithmetic); FLOPs = 2 × multiply-adds. The input takes the model's dtype and device,
    so a float64, CUDA or ``meta`` model (no memory, instant for any size) works alike.
    """
    with _modes_restored(model):
        model.eval()
        return count_macs(model, _example_input(model, input_shape))


@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Put every module's own train/eval flag back on exit, also after an error.

    ``model.train(was_training)`` would not do: it sets one flag on every submodule, losing
    a BN frozen in eval mode inside a model in train mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else count_parameters(module)


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"3x224x224"`` (or ``3×224×224``, ``3,224,224``) → (channels, height, width)."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        # Starts with the flag, which is where this text comes from in the CLI; the rest
        # says what an input shape is for callers of the function.
        raise ConfigError(
            f"--input must look like 3x224x224 (an input shape C×H×W with positive sizes), "
            f"got {text!r}"
        )
    return shape  # type: ignore[return-value]


def shape_text(shape: Sequence[int]) -> str:
    """``(3, 224, 224)`` → ``"3×224×224"``, as messages and tables show shapes."""
    return "×".join(map(str, shape))


def check_input_channels(model: nn.Module, input_shape: Sequence[int]) -> None:
    """A clear error when ``input_shape`` is not C×H×W or has another channel count than the
    model's first convolution takes. The message names the argument for API callers and the
    flag for CLI users."""
    shape = shape_text(input_shape)
    if len(input_shape) != 3:
        raise ConfigError(f"an input shape is C×H×W (3 numbers, without the batch), got {shape}")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and input_shape[0] != first_conv.in_channels:
        channels = first_conv.in_channels
        raise ConfigError(
            f"the model has {channels} input channels (it takes {channels}-channel images) but "
            f"the input shape {shape} (input_shape, --input) has {input_shape[0]}"
        )


def input_shape_of(model: ResNet) -> tuple[int, int, int]:
    """The input ``model`` was designed for: 224×224 for ImageNet stems, 32×32 for CIFAR.

    (:func:`resunit.models.default_input_shape` answers the same for a registered name.)
    """
    size = 224 if model.stem_type == "imagenet" else 32
    return model.in_chans, size, size


def _example_input(module: nn.Module, shape: Sequence[int]) -> Tensor:
    """A batch of one zero image that ``module`` accepts: its dtype, its device (or meta)."""
    dtype, device = dtype_and_device(module)
    return torch.zeros((1, *shape), dtype=dtype, device=device)


# --- inspect ------------------------------------------------------------------------------


@torch.no_grad()
def inspect_model(model: ResNet, input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """One row per residual unit (plus the stem and the head) and the totals of the model.

    Each unit row holds the input and output shape, the shortcut kind and a sentence saying
    why it was chosen, and the parameters and MACs of the residual branch and of the shortcut.
    Works on a model built on the ``meta`` device (no memory, instant for any size), and in
    any dtype or device. The model runs in eval mode; its modes are restored afterwards.
    """
    shape = tuple(input_shape) if input_shape else input_shape_of(model)
    check_input_channels(model, shape)
    with _modes_restored(model):
        model.eval()
        return _inspect_model(model, shape)


def _inspect_model(model: ResNet, shape: tuple[int, ...]) -> dict[str, Any]:
    x = _example_input(model, shape)
    rows: list[dict[str, Any]] = []
    stem_macs = count_macs(model.forward_stem, x)
    stem_out = model.forward_stem(x)
    stem_params = sum(_params(getattr(model, name, None)) for name in ("conv1", "bn1"))
    rows.append(_row("stem", "stem", x, stem_out, "", "", stem_params, stem_macs, 0, 0))
    x = stem_out
    for name, unit in model.named_units():
        residual_macs = count_macs(unit.residual, x)
        shortcut_macs = count_macs(unit.shortcut, x)
        out = unit(x)
        shortcut_params = _params(unit.downsample)
        rows.append(
            _row(
                name,
                type(unit).__name__,
                x,
                out,
                unit.shortcut_kind,
                describe_shortcut(unit, int(x.shape[-1])),
                _params(unit) - shortcut_params,
                residual_macs,
                shortcut_params,
                shortcut_macs,
            )
        )
        x = out
    features = model._finish_features(x)
    head_params = count_parameters(model) - sum(
        r["residual_params"] + r["shortcut_params"] for r in rows
    )
    head_macs = count_macs(model.forward_head, features)
    logits = model.forward_head(features)
    rows.append(_row("head", "pool+fc", x, logits, "", "", head_params, head_macs, 0, 0))
    return {
        "input": list(shape),
        "units": rows,
        "total_parameters": count_parameters(model),
        "total_macs": count_multiply_adds(model, shape),
    }


def _row(
    name: str,
    kind: str,
    x: Tensor,
    out: Tensor,
    shortcut: str,
    why: str,
    residual_params: int,
    residual_macs: int,
    shortcut_params: int,
    shortcut_macs: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "block": kind,
        "input_shape": list(x.shape[1:]),
        "output_shape": list(out.shape[1:]),
        "shortcut": shortcut,
        "shortcut_reason": why,
        "residual_params": residual_params,
        "residual_macs": residual_macs,
        "shortcut_params": shortcut_params,
        "shortcut_macs": shortcut_macs,
    }


def make_unit(
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    block: str = "basic",
    shortcut: str = "auto",
) -> ResidualUnit:
    """One unit that maps ``in_channels`` to ``out_channels`` (bottlenecks: out = 4 × planes)."""
    cls = resolve_block(block)
    if min(in_channels, out_channels, stride) < 1:
        # The CLI flags first (``resunit inspect block``), then the arguments they set.
        raise ConfigError(
            f"--in, --out-channels and --stride (in_channels, out_channels, stride) must be "
            f"≥ 1, got {in_channels}, {out_channels} and {stride}"
        )
    if out_channels % cls.expansion:
        raise ConfigError(
            f"a {block} unit outputs {cls.expansion}× its planes: out_channels "
            f"(--out-channels) must be a multiple of {cls.expansion}, got {out_channels}"
        )
    return cls(in_channels, out_channels // cls.expansion, stride, shortcut=shortcut)


@torch.no_grad()
def inspect_unit(unit: ResidualUnit, size: int) -> dict[str, Any]:
    """Walk one unit on a ``size``×``size`` input layer by layer: residual branch, shortcut,
    then the addition. Each step has its module, shapes, parameters and MACs.

    Runs in eval mode, in the unit's dtype and on its device (``meta`` works); the unit's
    modes are restored afterwards."""
    if size < 1:
        raise ConfigError(
            f"--size must be ≥ 1 (size: the input's height and width in pixels), got {size}"
        )
    with _modes_restored(unit):
        unit.eval()
        return _inspect_unit(unit, size)


def _inspect_unit(unit: ResidualUnit, size: int) -> dict[str, Any]:
    x = _example_input(unit, (unit.in_channels, size, size))
    steps: list[dict[str, Any]] = []
    names = {module: name for name, module in unit.named_modules()}
    branch = ["residual"]

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if list(module.children()):  # only leaves are layers (a Sequential is not)
            return
        summary = _module_summary(module)
        if unit.preactivation and isinstance(module, nn.BatchNorm2d):
            summary += " + ReLU"  # pre-activation units apply ReLU functionally after each BN
        # A module may run more than once: a bottleneck calls its one parameter-free ``relu``
        # after bn1 and after bn2 (nothing to say), and a pre-activation projection reads the
        # residual branch's BN–ReLU output, so the shortcut walk passes bn1 again. Parameters
        # count at the first call only, and the note says where they were counted.
        first = next((step for step in steps if step["_call"][0] is module), None)
        if first is not None and _params(module):
            if first["branch"] == branch[0]:
                summary += " (applied again; parameters counted above)"
            else:
                summary += f" (shared with the {first['branch']} branch)"
        steps.append(
            {
                "branch": branch[0],
                "layer": names[module],
                "module": summary,
                "input_shape": list(inputs[0].shape[1:]),
                "output_shape": list(output.shape[1:]),
                "params": 0 if first is not None else _params(module),
                "_call": (module, inputs[0].clone()),
            }
        )

    handles = [m.register_forward_hook(record) for m in unit.modules() if m is not unit]
    try:
        residual = unit.residual(x)
        branch[0] = "shortcut"
        shortcut = unit.shortcut(x)
    finally:
        for handle in handles:
            handle.remove()
    for step in steps:
        # Re-run each layer alone under the counter (hooks removed): the MACs of that step only.
        step["macs"] = count_macs(*step.pop("_call"))
    out = unit(x)
    if shortcut is None:
        merge = "ReLU(F(x))" if not unit.preactivation else "F(x)"
    elif unit.preactivation:
        merge = "F(x) + shortcut(x)  (no ReLU after the sum: pre-activation)"
    else:
        merge = "ReLU(F(x) + shortcut(x))"
    steps.append(
        {
            "branch": "output",
            "layer": "add" if shortcut is not None else "(no shortcut)",
            "module": merge,
            "input_shape": list(residual.shape[1:]),
            "output_shape": list(out.shape[1:]),
            "params": 0,
            "macs": 0,
        }
    )
    if shortcut is not None and unit.downsample is None:
        steps.insert(
            len(steps) - 1,
            {
                "branch": "shortcut",
                "layer": "identity",
                "module": "x itself",
                "input_shape": list(x.shape[1:]),
                "output_shape": list(shortcut.shape[1:]),
                "params": 0,
                "macs": 0,
            },
        )
    return {
        "block": type(unit).__name__,
        "input_shape": list(x.shape[1:]),
        "output_shape": list(out.shape[1:]),
        "shortcut": unit.shortcut_kind,
        "shortcut_reason": describe_shortcut(unit, size),
        "steps": steps,
        "total_parameters": count_parameters(unit),
        "total_macs": count_macs(unit, x),
    }


def _module_summary(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k, s = module.kernel_size, module.stride
        groups = f", groups {module.groups}" if module.groups > 1 else ""
        return f"conv {k[0]}×{k[1]}/{s[0]} {module.in_channels}→{module.out_channels}{groups}"
    if isinstance(module, nn.BatchNorm2d):
        return f"batch norm ({module.num_features})"
    if isinstance(module, nn.AvgPool2d):
        return f"avg-pool {module.kernel_size}/{module.stride}"
    if isinstance(module, nn.ReLU):
        return "ReLU"
    name = type(module).__name__
    extra = module.extra_repr()
    return f"{name} ({extra})" if extra else name


# --- residual ratios ----------------------------------------------------------------------


def image_batches(batches: Iterable[Tensor], what: str) -> Iterator[Tensor]:
    """``batches`` one by one, each checked to be an N×C×H×W tensor.

    One tensor passed where a list of batches belongs is refused: iterating it would yield
    single C×H×W images and fail deep inside the first layer.
    """
    if isinstance(batches, Tensor):
        raise ConfigError(
            f"{what} takes a list of image batches (N×C×H×W tensors), not one tensor: pass [batch]"
        )
    for batch in batches:
        if not isinstance(batch, Tensor) or batch.dim() != 4:
            got = shape_text(batch.shape) if isinstance(batch, Tensor) else repr(batch)
            raise ConfigError(f"{what}: each batch must be an N×C×H×W tensor, got {got[:80]}")
        yield batch


def residual_ratios(model: ResNet, batches: Iterable[Tensor]) -> list[dict[str, Any]]:
    """Per unit: mean over images of ‖F(x)‖ / ‖x‖ and the standard deviation of F(x).

    ``F(x)`` is the unit's residual branch alone (``unit.residual``) evaluated on the input
    the unit receives inside the intact network, in eval mode. A ratio near 0 means the unit
    is close to the identity; He et al. 2015 (Fig. 7) show residual responses shrinking with
    depth. The spread is the standard deviation over all elements of F(x), over all batches.
    The model's modes are restored afterwards.
    """
    stats: dict[str, dict[str, float]] = {}
    with _modes_restored(model), torch.no_grad():  # forward only: no graph to keep
        model.eval()
        for images in image_batches(batches, "residual_ratios"):
            x = model.forward_stem(images)
            for name, unit in model.named_units():
                residual = unit.residual(x).double()
                flat_x = x.double().flatten(1)
                flat_r = residual.flatten(1)
                # Images whose input is all zero have no defined ratio; rare, and skipped.
                input_norm = flat_x.norm(dim=1)
                valid = input_norm > 0
                ratio = flat_r.norm(dim=1)[valid] / input_norm[valid]
                s = stats.setdefault(
                    name, {"ratio_sum": 0.0, "images": 0, "sum": 0.0, "sumsq": 0.0, "count": 0}
                )
                s["ratio_sum"] += float(ratio.sum())
                s["images"] += int(valid.sum())
                s["sum"] += float(flat_r.sum())
                s["sumsq"] += float((flat_r * flat_r).sum())
                s["count"] += flat_r.numel()
                x = unit(x)
    if not stats:
        raise ConfigError("residual ratios need at least one batch of images")
    rows = []
    for index, (name, unit) in enumerate(model.named_units()):
        s = stats[name]
        mean = s["sum"] / s["count"]
        variance = max(s["sumsq"] / s["count"] - mean * mean, 0.0)
        rows.append(
            {
                "index": index,
                "name": name,
                "stage": name.split(".")[0],
                "shortcut": unit.shortcut_kind,
                "residual_ratio": s["ratio_sum"] / max(s["images"], 1),
                "residual_std": math.sqrt(variance),
            }
        )
    return rows


def mean_ratio_per_stage(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Average residual ratio of the units of each stage, in stage order."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["stage"], []).append(row["residual_ratio"])
    return {stage: sum(values) / len(values) for stage, values in groups.items()}


# --- lesion study -------------------------------------------------------------------------


class ShortcutOnly(nn.Module):
    """A lesioned unit: the unit's forward with its residual branch removed (F(x) = 0).

    A post-activation unit computes ``relu(F(x) + shortcut(x))``, so without F it computes
    ``relu(shortcut(x))``: the ReLU after the sum stays (a projection's BN output is
    negative in places, and those values must not reach the next unit). A pre-activation
    unit has no activation after the sum: ``shortcut(x)`` alone. A plain unit (no shortcut)
    has no sum to keep: its lesion skips it, ``x`` itself, possible only where the unit keeps
    the shape of its input (see :func:`can_lesion`).
    """

    def __init__(self, unit: ResidualUnit) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        out = self.unit.shortcut(x)
        if out is None:
            return x
        if self.unit.preactivation:
            return out
        if out is x:
            # The units' ReLU works in place: never overwrite the caller's tensor.
            out = out.clone()
        return self.unit.relu(out)


def can_lesion(unit: ResidualUnit) -> bool:
    """A unit with a shortcut can always be removed; a plain one only if shapes match."""
    return unit.has_shortcut or (unit.in_channels == unit.out_channels and unit.stride == 1)


@contextlib.contextmanager
def lesioned(model: ResNet, name: str) -> Iterator[ResNet]:
    """Within the block, unit ``name`` (e.g. ``"layer2.3"``) loses its residual branch
    (see :class:`ShortcutOnly`: a post-activation unit keeps its ReLU after the sum)."""
    names = [unit_name for unit_name, _ in model.named_units()]
    if name not in names:
        raise ConfigError(
            f"no unit {name!r} in this model{did_you_mean(str(name), names)}: its units are "
            f"{names[0]} … {names[-1]}"
        )
    stage_name, index = name.rsplit(".", 1)
    stage = getattr(model, stage_name)
    unit = stage[int(index)]
    if not can_lesion(unit):
        raise ConfigError(f"{name} has no shortcut and changes shape: it cannot be removed")
    stage[int(index)] = ShortcutOnly(unit)
    try:
        yield model
    finally:
        stage[int(index)] = unit


def lesion_study(
    model: ResNet,
    dataset: Any,
    *,
    input_size: int | None = None,
    batch_size: int = 500,
) -> dict[str, Any]:
    """Test accuracy of the intact model and with each unit removed in turn (Veit et al. 2016).

    Returns ``intact_accuracy`` and one row per unit with ``accuracy`` (None where the unit
    cannot be removed: a plain unit that changes shape) and ``drop`` = intact − lesioned.
    """
    from resunit.evaluation import evaluate

    def accuracy() -> float:
        return evaluate(model, dataset, batch_size, input_size=input_size)["accuracy"]

    intact = accuracy()
    rows = []
    for index, (name, unit) in enumerate(model.named_units()):
        value = None
        if can_lesion(unit):
            with lesioned(model, name):
                value = accuracy()
        rows.append(
            {
                "index": index,
                "name": name,
                "stage": name.split(".")[0],
                "shortcut": unit.shortcut_kind,
                "accuracy": value,
                "drop": None if value is None else intact - value,
            }
        )
    return {"intact_accuracy": intact, "units": rows}


def worst_lesion(result: dict[str, Any]) -> dict[str, Any] | None:
    """The row of the unit whose removal costs the most accuracy (None if none removable)."""
    rows = [r for r in result["units"] if r["drop"] is not None]
    return max(rows, key=lambda r: r["drop"]) if rows else None


# --- gradient flow ------------------------------------------------------------------------


def counterparts(model_name: str, **overrides: Any) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """The residual and the plain version of one architecture: ``version → (label, registered
    name, overrides)`` for :func:`~resunit.models.create_model`.

    The plain version drops every shortcut; for a plain model (``plain56``) the residual
    version is the paper's twin (``resnet56``, option A) or else the ``auto`` shortcut.
    """
    shortcut = overrides.get("shortcut", get_model_spec(model_name).kwargs.get("shortcut"))
    if normalize_shortcut_kind(shortcut or "auto") != "none":
        # Options that zero residual branches have no meaning (and are refused) without shortcuts.
        dropped = ("shortcut", "zero_init_residual", "drop_path_rate")
        plain = {**{k: v for k, v in overrides.items() if k not in dropped}, "shortcut": "none"}
        return {
            "residual": (model_name, model_name, overrides),
            "plain": (f"{model_name} without shortcuts", model_name, plain),
        }
    twin = "resnet" + model_name.removeprefix("plain")
    if model_name.startswith("plain") and twin in list_models():
        rest = {k: v for k, v in overrides.items() if k != "shortcut"}
        residual = (twin, twin, rest)
    else:
        residual = (f"{model_name} with shortcuts", model_name, {**overrides, "shortcut": "auto"})
    return {"residual": residual, "plain": (model_name, model_name, overrides)}


def layer_gradient_norms(model: nn.Module, images: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """‖∂loss/∂W‖ of every weight layer on the main path (convs and the classifier), in
    forward order, after one backward pass of the cross-entropy on ``images`` (train mode,
    as the first step of training sees it; the modes are restored afterwards, the BN running
    statistics are updated as that step would). Shortcut projections are left out so that a
    residual net and its plain counterpart have the same layers."""
    with _modes_restored(model):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
    rows = []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "downsample" in name:
            continue
        grad = param.grad
        norm = 0.0 if grad is None else float(grad.detach().double().norm())
        rows.append({"index": len(rows), "layer": name.removesuffix(".weight"), "grad_norm": norm})
    model.zero_grad(set_to_none=True)
    return rows


def gradient_flow(
    model_name: str,
    images: Tensor,
    labels: Tensor,
    *,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Gradient norm per layer at initialisation for an architecture's residual and plain
    versions (see :func:`counterparts`), both seeded alike and given the same batch.

    Returns ``{"residual": rows, "plain": rows, "labels": {"residual": …, "plain": …}}``.
    The models take as many input channels as ``images`` has unless ``in_chans`` is given.
    Torch's global random state is the same afterwards as before.
    """
    if not isinstance(model_name, str):
        raise ConfigError(
            "gradient_flow takes a model name (it builds the residual and the plain version "
            f"itself), got a {type(model_name).__name__}"
        )
    if images.dim() == 4:
        overrides.setdefault("in_chans", images.shape[1])
    result: dict[str, Any] = {"labels": {}}
    for version in ("residual", "plain"):
        label, name, options = counterparts(model_name, **overrides)[version]
        # The initialisation draws from the global CPU generator (nn.init has no generator
        # argument): seed it inside a fork, which puts the caller's state back on exit.
        # Only the CPU generator is seeded (torch.manual_seed would also reseed every GPU's,
        # outside the fork); the models are built on the CPU.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model = create_model(name, **options)
            result[version] = layer_gradient_norms(model, images, labels)
        result["labels"][version] = label
    return result


# --- everything about one trained checkpoint ------------------------------------------------


# The files ``analyze_checkpoint`` writes beside analysis.json (see ``_plot_analysis``).
PLOT_FILES = ("residual_ratios.png", "lesion.png", "gradient_flow.png")


def analyze_checkpoint(
    path: str | os.PathLike[str],
    *,
    data: str | None = None,
    data_root: str | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    out_dir: str | os.PathLike[str] | None = None,
    plots: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Residual ratios and lesion study of a trained checkpoint on its test data, and gradient
    flow at initialisation of its architecture vs the plain counterpart.

    ``data`` defaults to the dataset the checkpoint was trained on; ``limit`` caps the number
    of test images (lesion studies of big test sets are slow on a CPU). Writes
    ``analysis.json`` (and PNG plots unless ``plots=False``) to ``out_dir`` when given; that
    directory is checked before the analysis starts, so a bad one fails in a second.
    """
    from resunit.checkpoint import FEEDING_FIELDS, load_model
    from resunit.evaluation import prepare_batch
    from resunit.train import load_run_data

    # Named for both audiences: the Python argument and the CLI flag that sets it.
    batch_size = require_int("batch_size (--batch-size)", batch_size, 1)
    if limit is not None:
        limit = require_int("limit (--limit)", limit, 1)
    model, config = load_model(path, needs=FEEDING_FIELDS)
    data = data or config.get("data") or config.get("dataset")
    # As the run saw its data: same options, classes and channels checked, its normalisation.
    test_set = load_run_data(config, "test", data, data_root)
    if limit is not None:
        test_set = test_set.subset(torch.arange(min(limit, len(test_set))))
    input_size = config.get("input_size")
    # After the cheap checks above (so a typo in --checkpoint creates no directory), before
    # the minutes of analysis below.
    out = None
    if out_dir is not None:
        out = prepare_output_dir(out_dir, ["analysis.json", *(PLOT_FILES if plots else ())])

    def batches() -> Iterator[Tensor]:
        for start in range(0, len(test_set), batch_size):
            images = test_set.images[start : start + batch_size]
            yield prepare_batch(images, test_set.mean, test_set.std, input_size)

    ratios = residual_ratios(model, batches())
    lesion = lesion_study(model, test_set, input_size=input_size, batch_size=batch_size)
    train_set = load_run_data(config, "train", data, data_root)
    first = slice(0, min(128, len(train_set)))
    images = prepare_batch(train_set.images[first], test_set.mean, test_set.std, input_size)
    flow = gradient_flow(
        config["model"],
        images,
        train_set.labels[first],
        seed=seed,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        **dict(config.get("model_overrides") or {}),
    )
    worst = worst_lesion(lesion)
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "model": config["model"],
        "data": data,
        "test_images": len(test_set),
        "residual_ratios": ratios,
        "mean_ratio_per_stage": mean_ratio_per_stage(ratios),
        "lesion": lesion,
        "worst_lesion": worst,
        "gradient_flow": flow,
        "plots": {},
    }
    if out is not None:
        if plots:
            result["plots"] = _plot_analysis(result, out)
        write_json(out / "analysis.json", result)
    return result


def _plot_analysis(result: dict[str, Any], out: Path) -> dict[str, str]:
    from resunit import plots

    name = result["model"]
    flow = result["gradient_flow"]
    try:
        ratios_png, lesion_png, flow_png = (out / file for file in PLOT_FILES)
        paths = {
            "residual_ratios": plots.plot_residual_ratios(result["residual_ratios"], ratios_png),
            "lesion": plots.plot_lesion(result["lesion"], lesion_png, f"Lesion: {name}"),
            "gradient_flow": plots.plot_gradient_flow(
                {flow["labels"][v]: flow[v] for v in ("residual", "plain")}, flow_png
            ),
        }
    except ImportError:  # matplotlib is optional ([plot] extra): the numbers are still written
        return {}
    return {key: str(path) for key, path in paths.items()}


__all__ = [
    "ShortcutOnly",
    "analyze_checkpoint",
    "can_lesion",
    "check_input_channels",
    "count_macs",
    "count_multiply_adds",
    "counterparts",
    "gradient_flow",
    "image_batches",
    "input_shape_of",
    "inspect_model",
    "inspect_unit",
    "layer_gradient_norms",
    "lesion_study",
    "lesioned",
    "make_unit",
    "mean_ratio_per_stage",
    "parse_input_shape",
    "residual_ratios",
    "shape_text",
    "worst_lesion",
]
