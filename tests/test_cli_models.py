"""`resunit models` and `resunit --help`, end to end."""

import json
import subprocess
import sys

import pytest

from resunit.cli import main
from resunit.cli.common import run_command
from resunit.errors import ConfigError
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


def test_a_malformed_option_is_one_line_naming_the_command_and_its_help(capsys):
    # argparse's default would print the whole usage block before the error.
    try:
        main(["train", "--epochs", "many"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("a malformed option must stop the command")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("resunit train: error: argument --epochs: invalid int value")
    assert "resunit train --help" in err


@pytest.mark.parametrize(
    "env, label",
    [
        ({}, ""),
        ({"WORLD_SIZE": "1", "RANK": "0"}, ""),
        ({"WORLD_SIZE": "4", "RANK": "3"}, "[rank 3 of 4] "),
    ],
)
def test_error_line_names_the_rank_under_torchrun(monkeypatch, capsys, env, label):
    # Every torchrun rank prints its own error line; with several, each must say whose it is.
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def fails(args):
        raise ConfigError("no such file: data.npz")

    assert run_command(fails, None) == 2
    assert capsys.readouterr().err == f"resunit: error: {label}no such file: data.npz\n"


def test_output_cut_short_by_its_reader_is_quiet_not_a_traceback():
    # `resunit ... | head -1`: the reader closes the pipe after one line. The handler writes
    # far more than a pipe holds, so the writer is certain to meet the closed pipe.
    handler = "lambda args: print('row\\n' * 2_000_000)"
    code = (
        "import sys; from resunit.cli.common import run_command; "
        f"sys.exit(run_command({handler}, None))"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert writer.stdout is not None and writer.stderr is not None
    assert writer.stdout.readline() == b"row\n"
    writer.stdout.close()
    err = writer.stderr.read().decode()
    writer.wait(timeout=60)
    assert err == "" and writer.returncode == 141


@pytest.mark.parametrize(
    "argv, command",
    [
        (["eval", "--checkpoint", "a.pt", "b.pt"], "resunit eval"),
        (["data", "download", "cifar10", "--bogus"], "resunit data download"),
        (["--bogus"], "resunit"),
    ],
)
def test_an_unrecognized_argument_names_the_help_of_the_command_it_was_given_to(
    argv, command, capsys
):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{command}: error: unrecognized arguments: {argv[-1]}")
    assert err.rstrip().endswith(f"(see {command} --help)") and err.count("\n") == 1
