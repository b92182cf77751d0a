"""Datasets and batched augmentation: what the loaders return and what augmentation does."""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from resunit.data import (
    ImageDataset,
    augment,
    channel_stats,
    cutout,
    download_dataset,
    load_dataset,
    normalize,
    random_crop,
    random_flip,
    read_image,
)
from resunit.errors import DatasetError

# --- digits -------------------------------------------------------------------------------


def test_digits_is_the_real_scikit_learn_data_scaled_to_uint8():

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    reference = load_digits()
    # Every test image is one of scikit-learn's, scaled 0..16 → 0..255, with its own label.
    flat = {
        tuple(np.rint(img * 255 / 16).astype(int).ravel()): int(t)
        for img, t in zip(reference.images, reference.target, strict=True)
    }
    for image, label in zip(test.images, test.labels, strict=True):
        assert flat[tuple(image.flatten().tolist())] == int(label)


def _rows(dataset) -> collections.Counter:
    """The dataset's (image, label) pairs as a multiset: a few digits are pixel duplicates."""
    return collections.Counter(
        (tuple(x.flatten().tolist()), int(y))
        for x, y in zip(dataset.images, dataset.labels, strict=True)
    )


def test_digits_split_is_the_documented_stratified_split():
    # README: train_test_split(test_size=0.2, stratify=target, random_state=0), redone here.
    reference = load_digits()
    indices = np.arange(len(reference.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=0.2, stratify=reference.target, random_state=0
    )

    def expected(idx) -> collections.Counter:
        scaled = np.rint(reference.images[idx] * 255 / 16).astype(int)
        return collections.Counter(
            (tuple(img.ravel().tolist()), int(t))
            for img, t in zip(scaled, reference.target[idx], strict=True)
        )

    test = load_dataset("digits", "test")
    assert _rows(test) == expected(test_idx)
    assert _rows(load_dataset("digits", "train")) == expected(train_idx)
    again = load_dataset("digits", "test")  # fixed: the same images in the same order
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_validation_split_is_carved_from_train_and_never_touches_test():
    full = load_dataset("digits", "train")
    train = load_dataset("digits", "train", val_fraction=0.1)
    val = load_dataset("digits", "val", val_fraction=0.1)
    # Every training image goes to exactly one of the two; none comes from anywhere else.
    assert _rows(train) + _rows(val) == _rows(full)
    assert len(val) == pytest.approx(0.1 * len(full), abs=2)
    counts = torch.bincount(val.labels, minlength=10).float()  # stratified: ~10% of each class
    torch.testing.assert_close(
        counts, 0.1 * torch.bincount(full.labels, minlength=10).float(), atol=1, rtol=0
    )
    # Normalisation statistics stay those of the whole training split, so models agree.
    assert train.mean == full.mean == val.mean
    with pytest.raises(DatasetError, match="val_fraction"):
        load_dataset("digits", "val")


def test_channel_stats_and_normalize_match_float64_reference():
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double().numpy() / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.transpose(1, 0, 2, 3).reshape(3, -1).std(axis=1, ddof=1))
    out = normalize(images, mean, std)
    expected = (x - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


# --- augmentation ---------------------------------------------------------------------------


def _crop_reference(images, padding, dy, dx):
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    h, w = images.shape[-2:]
    return np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(dy))])


def test_random_crop_equals_per_image_pad_and_crop():
    images = torch.randint(0, 256, (16, 3, 6, 5), dtype=torch.uint8)
    out = random_crop(images, 2, torch.Generator().manual_seed(3))
    # Replay the same draws (dy then dx) and crop one image at a time, as tutorials do.
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (16,), generator=g).tolist()
    dx = torch.randint(0, 5, (16,), generator=g).tolist()
    np.testing.assert_array_equal(out.numpy(), _crop_reference(images, 2, dy, dx))
    assert len({(a, b) for a, b in zip(dy, dx, strict=True)}) > 4  # really random offsets


def test_flip_mirrors_exactly_the_drawn_images():
    images = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8)
    out = random_flip(images, torch.Generator().manual_seed(0))
    flipped = [
        torch.equal(o, i.flip(-1)) and not torch.equal(o, i)
        for o, i in zip(out, images, strict=True)
    ]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 5 < sum(flipped) < 27


def test_cutout_zeroes_one_square_per_image():
    images = torch.full((8, 3, 10, 10), 200, dtype=torch.uint8)
    out = cutout(images, 4, torch.Generator().manual_seed(1))
    for image in out:
        zeros = (image[0] == 0).nonzero()
        assert 4 <= len(zeros) <= 16  # clipped at the border, never more than 4×4
        assert (zeros.max(0).values - zeros.min(0).values <= 3).all()
        assert torch.equal(image[0] == 0, image[2] == 0)  # the same square in every channel


def test_augment_is_reproducible_from_the_generator_seed():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    kw = dict(crop_padding=2, flip=True, cutout_size=3)
    a = augment(images, torch.Generator().manual_seed(5), **kw)
    b = augment(images, torch.Generator().manual_seed(5), **kw)
    c = augment(images, torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape


# --- CIFAR ----------------------------------------------------------------------------------


def _write_cifar10_python(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f, protocol=2)
        all_data.append(data)
        all_labels += labels
    names = [
        n.encode()
        for n in [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
    ]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(all_data), all_labels


def test_cifar10_python_archive_is_read_in_order(tmp_path):
    data, labels = _write_cifar10_python(tmp_path / "cifar-10-batches-py")
    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert len(train) == 20 and len(test) == 4 and train.classes[0] == "airplane"
    np.testing.assert_array_equal(train.images.numpy().reshape(20, -1), data[:20])
    assert train.labels.tolist() == labels[:20] and test.labels.tolist() == labels[20:]


def test_a_meta_file_naming_fewer_classes_than_the_labels_use_is_a_data_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _, labels = _write_cifar10_python(folder)
    top = max(labels[:20])  # the training batches' largest label
    with (folder / "batches.meta").open("wb") as f:  # one class short of it
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(top)]}, f, protocol=2)
    message = rf"labels run from \d+ to {top} but there are {top} class names"
    with pytest.raises(DatasetError, match=message):
        load_dataset("cifar10", "train", str(tmp_path))


def test_cifar100_binary_archive_uses_the_fine_label(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    coarse, fine = rng.integers(0, 20, 6), rng.integers(0, 100, 6)
    records = np.concatenate([coarse[:, None], fine[:, None], pixels], axis=1).astype(np.uint8)
    records[:4].tofile(folder / "train.bin")
    records[4:].tofile(folder / "test.bin")
    (folder / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)) + "\n")
    train = load_dataset("cifar100", "train", str(tmp_path))
    assert train.labels.tolist() == fine[:4].tolist() and train.num_classes == 100
    np.testing.assert_array_equal(train.images.reshape(4, -1).numpy(), pixels[:4])


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", "train", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar10") in message and "resunit data download cifar10" in message


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_cifar10_python(tmp_path / "cifar-10-batches-py")
    with (tmp_path / "cifar-10-batches-py" / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"refusing to load (posix|os|nt)\.system"):
        load_dataset("cifar10", "train", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


# --- download -------------------------------------------------------------------------------


@pytest.fixture
def archive_server(tmp_path):
    """A 127.0.0.1 HTTP server serving a tiny CIFAR-10 archive (never the internet)."""
    source = tmp_path / "source"
    _write_cifar10_python(source / "cifar-10-batches-py", per_batch=2)
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "cifar.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (served / "broken.tar.gz").write_bytes(b"not an archive")
    handler = partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    md5 = hashlib.md5((served / "cifar.tar.gz").read_bytes()).hexdigest()
    yield f"http://127.0.0.1:{server.server_address[1]}", md5
    server.shutdown()


def test_download_verifies_md5_extracts_and_is_idempotent(tmp_path, archive_server):
    url, md5 = archive_server
    root = tmp_path / "data"
    target = download_dataset("cifar10", root, url=f"{url}/cifar.tar.gz", md5=md5, progress=False)
    assert target == root / "cifar-10-batches-py"
    assert len(load_dataset("cifar10", "train", str(root))) == 10
    stamp = (target / "data_batch_1").stat().st_mtime_ns
    # Re-running is a no-op: it does not even contact the server (a bad URL would fail).
    download_dataset("cifar10", root, url="http://127.0.0.1:9/none", md5=md5, progress=False)
    assert (target / "data_batch_1").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_failed_download_leaves_nothing_behind(tmp_path, archive_server):
    url, md5 = archive_server
    root = tmp_path / "new" / "data"
    with pytest.raises(DatasetError, match="MD5"):
        download_dataset("cifar10", root, url=f"{url}/cifar.tar.gz", md5="0" * 32, progress=False)
    assert not (tmp_path / "new").exists()  # not even the folders made for it
    root.mkdir(parents=True)
    with pytest.raises(DatasetError, match="failed"):
        download_dataset("cifar10", root, url=f"{url}/missing.tar.gz", md5=md5, progress=False)
    broken_md5 = hashlib.md5(b"not an archive").hexdigest()
    with pytest.raises(DatasetError, match="cannot extract"):
        download_dataset(
            "cifar10", root, url=f"{url}/broken.tar.gz", md5=broken_md5, progress=False
        )
    assert list(root.iterdir()) == []


# --- imagefolder and image files --------------------------------------------------------------


def test_read_image_converts_any_mode_to_model_channels_and_size(tmp_path):
    rgba = np.zeros((10, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half transparent → white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png", 3)
    assert out.shape == (3, 10, 6)
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, -1, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((20, 20), 77, np.uint8), "L").convert("P").save(tmp_path / "p.gif")
    gray = read_image(tmp_path / "p.gif", 1, (8, 8))
    assert gray.shape == (1, 8, 8) and int(gray.float().mean().round()) == 77
    assert read_image(tmp_path / "p.gif", 3).shape == (3, 20, 20)


def _image_folder(folder, classes=(("cat", 10), ("dog", 240)), count=3, size=(12, 9)):
    for cls, value in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(count):
            image = np.full((*size, 3), value + i, np.uint8)
            Image.fromarray(image).save(folder / cls / f"{i}.png")


def test_imagefolder_skips_or_fails_on_unreadable_files_by_flag(tmp_path, capsys):
    _image_folder(tmp_path / "train")
    _image_folder(tmp_path / "test")
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"garbage")
    data = load_dataset("imagefolder", "train", str(tmp_path), image_size=8)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 3, 8, 8)
    out, err = capsys.readouterr()
    assert "bad.png" in err and not out  # stdout stays clean for --json
    with pytest.raises(DatasetError, match=r"bad\.png"):
        load_dataset("imagefolder", "train", str(tmp_path), on_error="fail")
    # Test images take the training images' size even without image_size.
    test = load_dataset("imagefolder", "test", str(tmp_path / ""))
    assert test.images.shape == (6, 3, 12, 9)


def test_imagefolder_without_test_folder_holds_out_a_stratified_test_split(tmp_path):
    _image_folder(tmp_path, count=10)
    train = load_dataset("imagefolder", "train", str(tmp_path))
    test = load_dataset("imagefolder", "test", str(tmp_path))
    assert len(train) == 16 and len(test) == 4
    assert test.labels.bincount().tolist() == [2, 2]  # stratified

    # Pixel values are unique per image here: no test image is also a training image.
    def ids(data):
        return set(zip(data.labels.tolist(), data.images[:, 0, 0, 0].tolist(), strict=True))

    train_ids, test_ids = ids(train), ids(test)
    assert not train_ids & test_ids and len(train_ids | test_ids) == 20


def test_imagefolder_refuses_mismatched_classes_and_a_single_class(tmp_path):
    _image_folder(tmp_path / "a" / "train", classes=(("cat", 0), ("dog", 50), ("fox", 90)))
    _image_folder(tmp_path / "a" / "test", classes=(("cat", 0), ("fox", 90)))
    with pytest.raises(DatasetError, match="must be the same"):
        load_dataset("imagefolder", "test", str(tmp_path / "a"))
    _image_folder(tmp_path / "b", classes=(("cat", 0),))
    with pytest.raises(DatasetError, match="at least two"):
        load_dataset("imagefolder", "train", str(tmp_path / "b"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 0}, "num_classes must be an integer ≥ 2"),
        ({"num_samples": -5}, "num_samples"),
        ({"image_size": "abc"}, "image_size"),
        ({"val_seed": "abc"}, "val_seed"),
        ({"colour": 3}, "takes no option 'colour'"),
    ],
)
def test_bad_dataset_options_are_one_clear_error(options, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset("synthetic", "train", **options)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "f.tiff")
    expected = torch.from_numpy(np.rint(ramp * 255)).to(torch.uint8)
    for name in ("g16.png", "f.tiff"):
        image = read_image(tmp_path / name, channels=1)
        assert (image[0].int() - expected.int()).abs().max() <= 1, name


def test_a_float_image_that_overshoots_one_a_little_is_still_read_as_zero_to_one(tmp_path):
    # A bicubic resize of a [0, 1] image peaks slightly above 1; it must not be read as 0-255
    # (which would make it nearly black).
    ramp = np.linspace(0, 1.06, 64).reshape(8, 8)
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "f.tiff")
    expected = torch.from_numpy(np.rint(np.clip(ramp, 0, 1) * 255)).to(torch.uint8)
    image = read_image(tmp_path / "f.tiff", channels=1)
    assert (image[0].int() - expected.int()).abs().max() <= 1


def test_an_unreadable_image_is_reported_once_though_both_splits_read_its_folder(tmp_path, capsys):
    _image_folder(tmp_path, count=10)
    (tmp_path / "dog" / "broken.png").write_bytes(b"garbage")
    load_dataset("imagefolder", "train", str(tmp_path))
    load_dataset("imagefolder", "test", str(tmp_path))
    assert capsys.readouterr().err.count("broken.png") == 1


def test_synthetic_data_is_seeded_and_learnable():
    a = load_dataset("synthetic", "train", num_samples=64, image_size=8, seed=1)
    b = load_dataset("synthetic", "train", num_samples=64, image_size=8, seed=1)
    assert torch.equal(a.images, b.images) and isinstance(a, ImageDataset)
    # The class decides the mean colour: nearest-class-mean on colour separates the classes.
    colours = a.images.float().mean((2, 3))
    centres = torch.stack([colours[a.labels == k].mean(0) for k in a.labels.unique()])
    nearest = a.labels.unique()[torch.cdist(colours, centres).argmin(1)]
    assert (nearest == a.labels).float().mean() > 0.9


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_a_data_root_for_a_built_in_dataset_is_refused_rather_than_ignored(name, tmp_path):
    with pytest.raises(DatasetError, match=f"{name} is built in and reads no files"):
        load_dataset(name, "train", tmp_path)


def test_unknown_dataset_and_split_are_user_errors():
    with pytest.raises(DatasetError, match="choose one of"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", "dev")


def test_imagefolder_without_a_root_names_the_argument_and_the_flag():
    with pytest.raises(DatasetError, match=r"root=, or --data-root DIR"):
        load_dataset("imagefolder", "train", None)
