"""Where every benchmark's raw numbers go: one JSON file under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON to ``path`` (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
