"""Image datasets held in memory as uint8 tensors, and augmentation as whole-batch tensor ops.

Every loader returns an :class:`ImageDataset` (``N×C×H×W`` uint8 images, int64 labels, class
names and the per-channel mean/std used to normalise). Nothing here runs per image in Python
during training: random crops, flips and cutout are applied to a whole batch at once.

Datasets:

* ``digits`` (default) — scikit-learn's bundled 1,797 real 8×8 handwritten digits; nothing to
  download. Fixed stratified split: 20% test (360 images), ``random_state=0``.
* ``cifar10`` / ``cifar100`` — the official *binary* or *python* archives, extracted in a
  local directory; python pickles go through a restricted unpickler (numpy arrays only).
* ``imagefolder`` — ``ROOT/[SPLIT/]CLASS/IMAGE`` read with Pillow.
* ``synthetic`` — seeded random images whose class shifts their colour (tests, benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import re
import sys
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from resunit.errors import DatasetError
from resunit.outputs import check_output_location, folders_removed_on_failure, prepare_output_dir

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
SPLITS = ("train", "val", "test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass
class ImageDataset:
    """Images as a uint8 ``N×C×H×W`` tensor with int64 labels, class names and normalisation."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(
                f"{self.name}: images must be uint8 N×C×H×W, got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DatasetError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.labels = self.labels.to(torch.int64)
        if len(self.labels):  # e.g. a CIFAR meta file that names fewer classes than its batches use
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= len(self.classes):
                raise DatasetError(
                    f"{self.name}: labels run from {low} to {high} but there are "
                    f"{len(self.classes)} class names"
                )
        if not self.mean:
            self.mean, self.std = channel_stats(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: Tensor, name: str | None = None) -> ImageDataset:
        """The images at ``indices``, keeping classes and normalisation of this dataset."""
        return ImageDataset(
            self.images[indices],
            self.labels[indices],
            list(self.classes),
            name or self.name,
            self.mean,
            self.std,
        )


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 for accuracy)."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-3)
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images → float model input ``(x/255 − mean) / std``, per channel."""
    shape = (1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float().div(255) - m) / s


# --- loading ------------------------------------------------------------------------------


def load_dataset(
    name: str = "digits", split: str = "train", root: str | None = None, **options: Any
) -> ImageDataset:
    """Load ``split`` (train, val or test) of dataset ``name`` into memory.

    ``val_fraction`` (default 0) carves a stratified validation split out of *train* with
    ``val_seed`` (default 0): ``train`` is then what is left and ``val`` the carved part, so
    the test set is never used to pick checkpoints. Other options go to the loader
    (``image_size``, ``on_error`` for imagefolder; ``num_samples``, ``num_classes``,
    ``image_size``, ``channels``, ``seed`` for synthetic).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if root is not None and name in ("digits", "synthetic"):
        # Refused rather than ignored: the user meant some files, and none will be read.
        raise DatasetError(f"{name} is built in and reads no files: drop data_root (--data-root)")
    val_fraction = float(options.pop("val_fraction", 0.0) or 0.0)
    val_seed = options.pop("val_seed", 0)
    loader = _LOADERS[name]
    # Names first, then values: a value of an option the dataset does not take means nothing.
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("split", "root")]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        takes = [*accepted, "val_seed"]  # val_seed: any dataset's, for carving validation
        listed = (
            f"its options are {', '.join(takes)}" if accepted else "its only option is val_seed"
        )
        raise DatasetError(f"{name} takes no option {unknown[0]!r} ({listed})")
    _check_integer_options(name, {**options, "val_seed": val_seed})
    if split == "val" and val_fraction <= 0:
        raise DatasetError(f"{name} has no validation split: set val_fraction > 0 to carve one")
    base = loader("test" if split == "test" else "train", root, **options)
    if split == "test" or val_fraction <= 0:
        return base
    train_idx, val_idx = stratified_split(base.labels, val_fraction, val_seed)
    return base.subset(train_idx if split == "train" else val_idx, f"{base.name}")


# Integer dataset options and their smallest value (the CLI passes digits as int, else str).
_INTEGER_OPTIONS = {
    "num_samples": 1,
    "num_classes": 2,
    "image_size": 1,
    "channels": 1,
    "seed": 0,
    "val_seed": 0,
}


def _check_integer_options(name: str, options: dict[str, Any]) -> None:
    for key, smallest in _INTEGER_OPTIONS.items():
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise DatasetError(
                f"{name}: option {key} must be an integer ≥ {smallest}, got {value!r}"
            )
    if name == "imagefolder" and options.get("channels", 3) not in (1, 3):
        raise DatasetError(f"imagefolder: channels must be 1 or 3, got {options['channels']!r}")


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) with ``fraction`` of every class held out, reproducibly."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise DatasetError(f"validation fraction must be in (0, 1), got {fraction}")
    index = np.arange(len(labels))
    try:
        kept, held = train_test_split(
            index, test_size=fraction, stratify=labels.numpy(), random_state=seed
        )
    except ValueError:  # too few images to hold out one of every class: plain random split
        try:
            kept, held = train_test_split(index, test_size=fraction, random_state=seed)
        except ValueError:
            raise DatasetError(
                f"{len(labels)} images are too few to hold out {fraction:.0%} of them"
            ) from None
    return torch.from_numpy(np.sort(kept)), torch.from_numpy(np.sort(held))


def _load_digits(split: str, root: str | None = None) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 ink levels → 0..255, the range every other dataset uses.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    classes = [str(i) for i in range(10)]
    train_images = torch.from_numpy(images)[train_idx]
    # Normalise with statistics of the training images only, for both splits.
    mean, std = channel_stats(train_images)
    return ImageDataset(torch.from_numpy(images)[idx], labels[idx], classes, "digits", mean, std)


def _load_synthetic(
    split: str,
    root: str | None = None,
    *,
    num_samples: int | None = None,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> ImageDataset:
    n = num_samples or (512 if split == "train" else 128)
    g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    labels = torch.randint(num_classes, (n,), generator=g)
    # Noise plus a per-class colour shift: learnable, so tests can check that loss falls.
    palette = torch.randint(
        0, 160, (num_classes, channels, 1, 1), generator=torch.Generator().manual_seed(seed)
    )
    noise = torch.randint(0, 96, (n, channels, image_size, image_size), generator=g)
    images = (noise + palette[labels]).to(torch.uint8)
    classes = [f"class{i}" for i in range(num_classes)]
    return ImageDataset(images, labels, classes, "synthetic")


# CIFAR: official archive layouts (https://www.cs.toronto.edu/~kriz/cifar.html).
_CIFAR = {
    "cifar10": {
        "python": (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "batches.meta",
            "label_names",
            b"labels",
        ),
        "binary": (
            "cifar-10-batches-bin",
            [f"data_batch_{i}.bin" for i in range(1, 6)],
            ["test_batch.bin"],
            "batches.meta.txt",
            1,
        ),
    },
    "cifar100": {
        "python": (
            "cifar-100-python",
            ["train"],
            ["test"],
            "meta",
            "fine_label_names",
            b"fine_labels",
        ),
        "binary": ("cifar-100-binary", ["train.bin"], ["test.bin"], "fine_label_names.txt", 2),
    },
}
CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python pickles contain: numpy arrays, dtypes and builtins."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # How protocol-2 pickles written by Python 3 spell bytes; encodes a string, nothing else.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path} is not a valid CIFAR python batch: {exc}") from None


def default_data_root(name: str) -> str | None:
    """Where ``name`` is read from when no root is given: ``$RESUNIT_DATA`` or ``data`` for
    the CIFAR sets; None for those that need none (digits, synthetic) or must be told
    (imagefolder)."""
    return _cifar_root() if name in ("cifar10", "cifar100") else None


def _cifar_root() -> str:
    return os.environ.get("RESUNIT_DATA", "data")


def _load_cifar(name: str, split: str, root: str | None) -> ImageDataset:
    base = Path(root or _cifar_root()) / name
    candidates = [base, base.parent]
    layout = None
    for directory in candidates:
        for kind, spec in _CIFAR[name].items():
            if (directory / spec[0]).is_dir():
                layout, folder = kind, directory / spec[0]
                break
        if layout:
            break
    if layout is None:
        names = " or ".join(f"{spec[0]}/" for spec in _CIFAR[name].values())
        raise DatasetError(
            f"{name} not found in {base} or {base.parent}: expected {names} in one of them "
            f"(run `resunit data download {name} --root {base.parent}`, or extract the official "
            "archive there)"
        )
    spec = _CIFAR[name][layout]
    files = spec[1] if split == "train" else spec[2]
    missing = [f for f in [*files, spec[3]] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{folder} is incomplete: missing {', '.join(missing)} "
            f"(re-extract the official {name} archive)"
        )
    images, labels = [], []
    if layout == "python":
        for f in files:
            batch = _read_pickle(folder / f)
            try:
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[spec[5]], dtype=np.int64))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise DatasetError(f"{folder / f} is not a {name} batch: {exc}") from None
            if len(labels[-1]) != len(images[-1]):
                raise DatasetError(f"{folder / f} holds more images than labels, or fewer")
        meta = _read_pickle(folder / spec[3])
        try:
            classes = [c.decode() for c in meta[spec[4].encode()]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{folder / spec[3]} is not a {name} meta file: {exc}") from None
    else:
        label_bytes = spec[4]
        record = label_bytes + 3072
        for f in files:
            raw = np.fromfile(folder / f, dtype=np.uint8)
            if raw.size % record:
                raise DatasetError(
                    f"{folder / f} is truncated ({raw.size} bytes is not a multiple of {record})"
                )
            raw = raw.reshape(-1, record)
            labels.append(raw[:, label_bytes - 1].astype(np.int64))  # fine label is last
            images.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
        classes = [c for c in (folder / spec[3]).read_text().split() if c]
    mean, std = CIFAR_MEAN_STD[name]
    return ImageDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        classes,
        name,
        mean,
        std,
    )


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def read_image(
    path: str | os.PathLike[str], channels: int, size: tuple[int, int] | None = None
) -> Tensor:
    """One image file of any mode (grayscale, RGBA, palette …) as uint8 ``C×H×W``.

    Transparent pixels are composited on white; ``size`` (H, W) resizes with bilinear filtering.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns about images above ~89 megapixels (and refuses twice that, caught
            # below): a file the user named is meant to be read, so no raw warning text.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = _to_8_bit(img)
                array = _to_array(img, channels, size)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path} is a directory: give image files") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        reason = str(exc).replace(f" {str(path)!r}", "")  # Pillow quotes the path: name it once
        raise DatasetError(f"cannot read image {path}: {reason}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_array(img: Any, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """An 8-bit Pillow image as a uint8 ``H×W(×C)`` array: transparency laid on white, then
    converted to ``channels`` and resized to ``size`` (H, W)."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_8_bit(img: Any) -> Any:
    """16-bit, 32-bit integer and float grayscale images as 8-bit "L", scaled, not clipped.

    Pillow's own ``convert("L")`` clips such pixels to 255 (16-bit) or truncates floats, which
    turns a 16-bit scan white and a float image in [0, 1] black.
    """
    from PIL import Image

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    values = np.asarray(img, dtype=np.float64)
    top = values.max(initial=0.0)
    if img.mode.startswith("I;16") or 255 < top <= 65535:
        scale = 255 / 65535
    elif img.mode == "F" and top <= 1.1:
        # Float images conventionally hold [0, 1]; resampling overshoots that a little (a
        # bicubic resize peaks near 1.06), which must not flip the image to the 0-255 reading.
        scale = 255.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


# Held out as the test split of an image folder that has no test/ of its own.
IMAGEFOLDER_TEST_FRACTION = 0.2


def _load_imagefolder(
    split: str,
    root: str | None,
    *,
    image_size: int | None = None,
    channels: int = 3,
    on_error: str = "skip",
) -> ImageDataset:
    """``ROOT/train/CLASS/*`` and ``ROOT/test/CLASS/*``; or ``ROOT/CLASS/*`` (or only train/),
    of which a fixed stratified 20% is held out as the test split."""
    if root is None:
        raise DatasetError(
            "imagefolder needs a directory (root=, or --data-root DIR) holding one sub-folder "
            "per class (optionally inside train/ and test/)"
        )
    if on_error not in ("skip", "fail"):
        raise DatasetError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"image folder not found: {base}")
    train_dir = base / "train" if (base / "train").is_dir() else base
    if (base / "test").is_dir() and train_dir == base:
        raise DatasetError(f"{base} has test/ but no train/: put the training images in train/")
    size = (image_size, image_size) if image_size else None
    if (base / "test").is_dir():
        train_classes = _class_folders(train_dir)
        if split == "train":
            return _read_image_folder(train_dir, train_classes, channels, size, on_error)[0]
        test_classes = _class_folders(base / "test")
        if test_classes != train_classes:
            raise DatasetError(
                f"{base}/test has classes {', '.join(test_classes)} but train/ has "
                f"{', '.join(train_classes)}: they must be the same folders"
            )
        # Test images take the training images' size, as the model will expect.
        size = size or _read_image_folder(train_dir, train_classes, channels, None, "skip", 1)[1]
        return _read_image_folder(base / "test", test_classes, channels, size, on_error)[0]
    # No separate test images: hold out a fixed stratified part, so that test accuracy is never
    # measured on images the model trained on.
    whole = _read_image_folder(train_dir, _class_folders(train_dir), channels, size, on_error)[0]
    kept, held = stratified_split(whole.labels, IMAGEFOLDER_TEST_FRACTION, seed=0)
    part = whole.subset(held if split == "test" else kept)
    part.mean, part.std = channel_stats(part.images)  # its own statistics, not the whole's
    return part


def _class_folders(folder: Path) -> list[str]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in SPLITS)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(
            f"{folder} needs a sub-folder per class, at least two ({found}): {folder}/CLASS/IMAGE"
        )
    return classes


# Unreadable images already reported in this process.
_REPORTED_SKIPS: set[Path] = set()


def _read_image_folder(
    folder: Path,
    classes: list[str],
    channels: int,
    size: tuple[int, int] | None,
    on_error: str,
    limit: int | None = None,
) -> tuple[ImageDataset, tuple[int, int]]:
    """The images of ``folder/CLASS/*`` (at most ``limit``) and the size they all have."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                image = read_image(path, channels, size)
            except DatasetError as exc:
                if on_error == "fail":
                    raise
                # stderr: stdout may be JSON that a script reads. Once per file: a folder
                # without test/ is read for each split.
                if path not in _REPORTED_SKIPS:
                    _REPORTED_SKIPS.add(path)
                    print(f"resunit: skipping an unreadable image: {exc}", file=sys.stderr)
                continue
            if size is None:  # the first image fixes the size of all the others
                size = (image.shape[1], image.shape[2])
            images.append(image)
            labels.append(label)
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if not images or size is None:
        raise DatasetError(f"no readable images under {folder}")
    dataset = ImageDataset(torch.stack(images), torch.tensor(labels), classes, "imagefolder")
    return dataset, size


_LOADERS = {
    "digits": _load_digits,
    "cifar10": functools.partial(_load_cifar, "cifar10"),
    "cifar100": functools.partial(_load_cifar, "cifar100"),
    "imagefolder": _load_imagefolder,
    "synthetic": _load_synthetic,
}


# --- augmentation (whole batches, tensor ops) -----------------------------------------------


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator, device: Any) -> Tensor:
    # Drawn where the generator lives (a CPU generator also drives CUDA batches), then moved.
    return torch.randint(0, high, shape, generator=generator, device=generator.device).to(device)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per image (random translation).

    One gather per axis for the whole batch, instead of a Python loop over images.
    """
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = _randint(2 * padding + 1, (n,), generator, images.device)
    dx = _randint(2 * padding + 1, (n,), generator, images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    c = images.shape[1]
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(n, c, h, w))


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror a random half of the batch left-right."""
    flip = _randint(2, (len(images),), generator, images.device).bool()
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero a ``size×size`` square at a random centre of every image (DeVries & Taylor 2017)."""
    if size <= 0:
        return images
    n, _, h, w = images.shape
    cy = _randint(h, (n, 1), generator, images.device)
    cx = _randint(w, (n, 1), generator, images.device)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)
    in_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)
    mask = in_y[:, :, None] & in_x[:, None, :]
    return images.masked_fill(mask[:, None], 0)


def augment(
    images: Tensor,
    generator: torch.Generator,
    *,
    crop_padding: int = 0,
    flip: bool = False,
    cutout_size: int = 0,
) -> Tensor:
    """Pad + random crop, horizontal flip and cutout on a uint8 batch, in that order."""
    images = random_crop(images, crop_padding, generator)
    if flip:
        images = random_flip(images, generator)
    return cutout(images, cutout_size, generator)


# --- download -------------------------------------------------------------------------------

DOWNLOADS = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}


def download_dataset(
    name: str,
    root: str | os.PathLike[str],
    *,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch, verify (MD5) and extract an official archive into ``root``; returns the folder.

    Atomic: the archive is downloaded and extracted inside a temporary folder in ``root``
    and only the finished dataset folder is renamed into place, so an interrupted run leaves
    no half dataset behind. If the folder is already there, nothing is done.
    """
    if name not in DOWNLOADS:
        raise DatasetError(f"cannot download {name!r}: choose one of {', '.join(DOWNLOADS)}")
    default_url, default_md5, folder_name = DOWNLOADS[name]
    if md5 is not None:
        if url is None:
            # The official archive's checksum is known; replacing it would only hide corruption.
            raise DatasetError("md5 (--md5) checks the archive at url (--url); give both or none")
        if not isinstance(md5, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", md5.strip()):
            raise DatasetError(f"md5 (--md5) must be 32 hexadecimal digits, got {md5!r}")
        md5 = md5.strip().lower()  # md5sum prints lower case; some sites print upper
    url, md5 = url or default_url, md5 or default_md5
    root = Path(root)
    target = root / folder_name
    if target.is_dir():
        return target
    check_output_location(root, "--root", kind="directory")
    # A failed download leaves nothing behind, not even the folders it created for it.
    with folders_removed_on_failure(root):
        prepare_output_dir(root, option="--root")  # creatable and writable, before downloading
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            _fetch_and_extract(name, url, md5, folder_name, Path(tmp), target, progress)
    return target


def _fetch_and_extract(
    name: str, url: str, md5: str, folder_name: str, tmp: Path, target: Path, progress: bool
) -> None:
    """Download ``url`` into ``tmp``, check its MD5, extract it there and move its
    ``folder_name`` to ``target`` in one rename."""
    archive = tmp / "archive.tar.gz"
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, archive.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            bar = _progress_bar(total, f"{name}", progress)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
            bar.close()
    except (OSError, ValueError) as exc:  # ValueError: not a URL at all
        raise DatasetError(f"download of {url} failed: {exc}") from None
    if digest.hexdigest() != md5:
        official = md5 == DOWNLOADS[name][1]  # the user's own checksum cannot be "corrupt"
        raise DatasetError(
            f"{url} has MD5 {digest.hexdigest()}, expected {md5}: "
            + (
                "the download is corrupt; run the command again"
                if official
                else "the file there is not the archive that checksum names (or it is corrupt)"
            )
        )
    extracted = tmp / "extracted"
    try:
        with tarfile.open(archive) as tar:
            _extract_safely(tar, extracted)
    except (tarfile.TarError, OSError) as exc:
        reason = " ".join(str(exc).split())  # tarfile's messages span several lines
        raise DatasetError(f"cannot extract {url}: {reason}") from None
    if not (extracted / folder_name).is_dir():
        raise DatasetError(f"{url} does not contain {folder_name}/")
    os.replace(extracted / folder_name, target)


def _extract_safely(tar: tarfile.TarFile, folder: Path) -> None:
    """Extract only plain files and folders inside ``folder`` (no links, devices or ``..``)."""
    if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
        tar.extractall(folder, filter="data")
        return
    members = tar.getmembers()
    for member in members:
        inside = (folder / member.name).resolve().is_relative_to(folder.resolve())
        if not inside or not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"refusing archive member {member.name!r}")
    tar.extractall(folder, members=members)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total or None, desc=desc, unit="B", unit_scale=True, disable=not enabled)


__all__ = [
    "DATASETS",
    "ImageDataset",
    "augment",
    "channel_stats",
    "cutout",
    "default_data_root",
    "download_dataset",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_flip",
    "read_image",
    "stratified_split",
]
