"""`resunit models` and `resunit --help`, end to end."""

import json
import subprocess
import sys

from resunit.cli import main
from resunit.models import list_models


def test_models_json_lists_every_model_with_its_parameter_count(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_models()
    counts = {r["name"]: r["parameters"] for r in rows}
    assert counts["resnet20"] == 269_722 and counts["resnet50"] == 25_557_032


def test_models_table_for_people(capsys):
    assert main(["models", "--family", "cifar"]) == 0
    out = capsys.readouterr().out
    assert "resnet56" in out and "853,018" in out and "resnet50 " not in out


def test_unknown_family_is_one_line_and_exit_2(capsys):
    assert main(["models", "--family", "martian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resunit: error: unknown family 'martian'") and err.count("\n") == 1


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "resunit", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "models" in result.stdout
