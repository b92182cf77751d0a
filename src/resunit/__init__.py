"""resunit: residual networks in PyTorch — build, train, inspect and run them fast."""

from resunit.blocks import (
    BasicBlock,
    Bottleneck,
    PadShortcut,
    PreActBasicBlock,
    PreActBottleneck,
    ResidualUnit,
    resolve_shortcut,
)
from resunit.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DeployError,
    ResunitError,
    TrainingError,
)
from resunit.models import ResNet, count_parameters, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DeployError",
    "PadShortcut",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ResidualUnit",
    "ResunitError",
    "TrainingError",
    "__version__",
    "count_parameters",
    "create_model",
    "list_models",
    "resolve_shortcut",
]
