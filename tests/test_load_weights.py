"""Loading weights into a model: strict but for a classifier head of another size."""

import pytest
import torch

from resunit.checkpoint import load_weights
from resunit.errors import CheckpointError
from resunit.models import create_model


def test_a_1000_class_checkpoint_loads_into_a_10_class_model_except_the_head(tmp_path):
    source = create_model("resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pt"
    torch.save(source.state_dict(), path)
    target = create_model("resnet18", num_classes=10)
    fresh_head = target.fc.weight.clone()

    report = load_weights(target, path)

    assert report.skipped_head == ["fc.bias", "fc.weight"]
    assert "kept a fresh classifier head" in report.summary()
    assert torch.equal(target.fc.weight, fresh_head)
    for key, value in target.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source.state_dict()[key]), key


def test_same_classes_loads_everything_and_gives_identical_outputs():
    source = create_model("resnet20").eval()
    target = create_model("resnet20").eval()
    report = load_weights(target, {"model": source.state_dict()})  # a wrapped checkpoint
    assert report.skipped_head == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_ddp_module_prefix_is_stripped():
    source = create_model("resnet20")
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = create_model("resnet20")
    load_weights(target, wrapped)
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_another_architecture_is_refused_with_the_mismatched_keys():
    with pytest.raises(CheckpointError, match=r"missing layer1\.3\.bn1"):
        load_weights(create_model("resnet32"), create_model("resnet20").state_dict())
    with pytest.raises(
        CheckpointError, match=r"unexpected layer2\.0\.downsample.*shape mismatch bn1"
    ):
        load_weights(
            create_model("resnet20"), create_model("resnet18", num_classes=10).state_dict()
        )
