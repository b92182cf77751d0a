"""Regenerate torchvision_state_dicts.json: the (key, shape) list of torchvision's ResNets.

Run with a Python that has torchvision (not a resunit dependency):
    python tests/data/make_torchvision_reference.py
The file it writes is the independent reference that tests/test_models.py compares against.
"""

import json
from pathlib import Path

import torch
import torchvision

NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
]  # fmt: skip

reference = {"torchvision": torchvision.__version__, "models": {}}
for name in NAMES:
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    reference["models"][name] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()],
    }
out = Path(__file__).with_name("torchvision_state_dicts.json")
out.write_text(json.dumps(reference, separators=(",", ":")))
print(f"wrote {out} ({out.stat().st_size:,} bytes)")
