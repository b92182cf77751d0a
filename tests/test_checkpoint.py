"""Checkpoints: atomic writes, safe reads, clear refusals, rebuilding a trained model."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from resunit.checkpoint import (
    extract_state_dict,
    load_model,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from resunit.errors import CheckpointError
from resunit.models import create_model


def _config(**extra):
    return {
        "model": "resnet20",
        "num_classes": 10,
        "in_chans": 1,
        "model_overrides": {},
        "mean": [0.3],
        "std": [0.4],
        "classes": [str(i) for i in range(10)],
        "input_size": 8,
        **extra,
    }


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "run" / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(3.0)}, "epoch": 1}, path)
    save_checkpoint({"model": {"w": torch.arange(4.0)}, "epoch": 2}, path)
    assert os.listdir(path.parent) == ["last.pt"]
    assert read_checkpoint(path)["epoch"] == 2


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by an object that cannot be saved)")

    with pytest.raises(RuntimeError):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "bad": Unpicklable()}, path)
    assert read_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    # torch.save pickles with the standard pickler, so the exploit is a real torch file.
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_file_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": create_model("resnet20").state_dict(), "config": _config()}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(1000))
    (tmp_path / "damaged.pt").write_bytes(data[:200] + b"\xff" * 40 + data[240:])
    for name in ("truncated.pt", "noise.pt", "damaged.pt"):
        with pytest.raises(CheckpointError, match="truncated or corrupt") as caught:
            read_checkpoint(tmp_path / name)
        # One short line: torch's paragraph of advice (and its weights_only=False hint) cut.
        message = str(caught.value)
        assert "\n" not in message and "weights_only" not in message and len(message) < 300
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    assert zipfile.is_zipfile(good)  # the good one is the normal torch format


def test_another_architecture_lists_the_mismatched_keys(tmp_path):
    path = tmp_path / "r32.pt"
    model = create_model("resnet32", num_classes=10, in_chans=1)
    save_checkpoint({"model": model.state_dict(), "config": _config()}, path)
    with pytest.raises(CheckpointError, match=r"unexpected layer1\.3\.bn1\.bias, .* and \d+ more"):
        load_model(path)  # the config claims resnet20 but the weights are resnet32's


def test_load_model_rebuilds_the_trained_model_exactly(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, zero_init_residual=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    config = _config(model_overrides={"zero_init_residual": True})
    save_checkpoint({"model": model.state_dict(), "config": config}, tmp_path / "m.pt")
    loaded, loaded_config = load_model(tmp_path / "m.pt")
    assert not loaded.training and loaded_config["classes"] == config["classes"]
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_load_model_needs_a_resunit_config(tmp_path):
    path = tmp_path / "bare.pt"
    save_checkpoint(create_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match="no resunit model config"):
        load_model(path)
    # …but the bare weights still load into a model the user builds (the old API still works).
    report = load_weights(create_model("resnet20"), path)
    assert len(report.loaded) == len(create_model("resnet20").state_dict())


def test_ddp_prefix_is_stripped():
    state = {"module.fc.weight": torch.ones(1), "module.fc.bias": torch.ones(1)}
    assert set(extract_state_dict({"model": state})) == {"fc.weight", "fc.bias"}


def _trained_like(name: str = "resnet20", **kw) -> torch.nn.Module:
    """A model whose weights and BN statistics are not the fresh ones (so loading shows)."""
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, **kw)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return model.eval()


def test_a_model_built_on_the_meta_device_gets_real_weights(tmp_path):
    source = _trained_like(num_classes=10)
    path = tmp_path / "m.pt"
    save_checkpoint({"model": source.state_dict()}, path)
    for given in (path, source.state_dict()):
        with torch.device("meta"):
            model = create_model("resnet20", num_classes=10, in_chans=1)
        report = load_weights(model, given)
        assert len(report.loaded) == len(source.state_dict()) and report.skipped_head == []
        tensors = [*model.parameters(), *model.buffers()]
        assert not any(t.is_meta for t in tensors)
        assert all(p.requires_grad for p in model.parameters())
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(model.eval()(x), source(x))
    # The model got copies of the caller's tensors, as a copying load gives: training it
    # leaves the dictionary it was given untouched.
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    assert not torch.equal(model.conv1.weight, source.conv1.weight)


def test_a_meta_model_keeps_its_dtype_and_gets_a_real_fresh_head():
    source = _trained_like(num_classes=10)
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    with torch.device("meta"):
        model = create_model("resnet20", num_classes=4, in_chans=1)
    report = load_weights(model, half)
    assert report.skipped_head == ["fc.bias", "fc.weight"]
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.conv1.weight.dtype == torch.float32  # as a copying load would convert
    assert torch.equal(model.conv1.weight, source.conv1.weight.half().float())
    assert model.fc.weight.shape == (4, 64) and model.fc.weight.abs().sum() > 0
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_a_headless_model_ignores_the_checkpoints_head(tmp_path):
    source = _trained_like(num_classes=10)
    path = tmp_path / "with_head.pt"
    save_checkpoint(source.state_dict(), path)
    model = create_model("resnet20", num_classes=0, in_chans=1).eval()
    report = load_weights(model, path)
    assert report.skipped_head == ["fc.bias", "fc.weight"]
    assert "ignored the checkpoint's classifier head" in report.summary()
    assert "the model has none" in report.summary()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        features = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.equal(model(x), features)


def test_a_checkpoint_without_a_head_leaves_the_models_fresh_head():
    source = _trained_like(num_classes=0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    fresh_head = model.fc.weight.clone()
    report = load_weights(model, source.state_dict())
    assert report.skipped_head == ["fc.bias", "fc.weight"]
    assert "kept a fresh classifier head" in report.summary()
    assert "not in the checkpoint" in report.summary()
    assert torch.equal(model.fc.weight, fresh_head)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    # Anything else missing is still another architecture.
    other = create_model("resnet32", num_classes=0, in_chans=1).state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected layer1\.3\."):
        load_weights(create_model("resnet20", num_classes=0, in_chans=1), other)


def test_load_model_refuses_weights_whose_head_is_not_the_configs(tmp_path):
    # Tolerated when fine-tuning, but a trained model's checkpoint must hold its own head.
    for num_classes, reason in ((5, "shape differs"), (0, "not in the checkpoint")):
        path = tmp_path / f"head{num_classes}.pt"
        weights = create_model("resnet20", num_classes=num_classes, in_chans=1).state_dict()
        save_checkpoint({"model": weights, "config": _config()}, path)
        with pytest.raises(CheckpointError, match=f"10 classes its config names .*{reason}"):
            load_model(path)
