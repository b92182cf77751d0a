"""Output locations are refused before the work, and files are written whole or not at all."""

import json
import os

import pytest

from resunit.cli.common import print_json
from resunit.errors import ConfigError
from resunit.outputs import (
    check_output_location,
    prepare_output_dir,
    write_json,
    write_jsonl,
    write_text,
)


def test_a_location_of_the_wrong_kind_or_below_a_file_is_refused_and_nothing_is_created(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(ConfigError, match="is a file; give a directory"):
        check_output_location(a_file, "--out", kind="directory")
    with pytest.raises(ConfigError, match="is a directory; give a file name"):
        check_output_location(tmp_path / "a-dir", "--out")
    with pytest.raises(ConfigError, match="which is a file"):
        check_output_location(a_file / "deeper" / "x.json", "--out")
    check_output_location(tmp_path / "new" / "x.json", "--out")  # fine, and not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]
    assert a_file.read_text() == "keep"


def test_prepare_output_dir_creates_it_and_refuses_a_directory_where_a_file_goes(tmp_path):
    out = prepare_output_dir(tmp_path / "run" / "analysis", ["analysis.json"])
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe leaves nothing
    (out / "analysis.json").mkdir()
    with pytest.raises(ConfigError, match=r"analysis\.json is a directory"):
        prepare_output_dir(out, ["analysis.json"])


def test_write_json_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"accuracy": 0.5})
    write_json(path, {"accuracy": 0.75})
    assert json.loads(path.read_text()) == {"accuracy": 0.75}
    # A name one byte too long for the file system makes the temporary file fail to open.
    with pytest.raises(ConfigError, match="cannot write"):
        write_text(tmp_path / ("x" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)), "text")
    (tmp_path / "missing-link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="cannot write"):
        write_json(tmp_path / "missing-link" / "a.json", {})  # below a dangling symlink
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing-link", "summary.json"]
    assert json.loads(path.read_text()) == {"accuracy": 0.75}


def test_files_written_atomically_get_the_mode_a_plain_open_would(tmp_path):
    # mkstemp makes its file 0600; a report or exported model must be as readable as any
    # file the user writes (0644 under the usual umask 022).
    previous = os.umask(0o022)
    try:
        path = write_json(tmp_path / "summary.json", {})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644


def test_replacing_a_file_keeps_its_mode(tmp_path):
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)  # the user's choice for this file survives a rewrite
    write_json(private, {"a": 1})
    assert private.stat().st_mode & 0o777 == 0o600 and json.loads(private.read_text()) == {"a": 1}


def _strict_loads(text: str):
    """json.loads as jq or a browser read JSON: NaN and Infinity are not JSON."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_results_write_non_finite_numbers_as_null(tmp_path, capsys):
    # A diverged model's loss is NaN; Python would write the token NaN, which is not JSON.
    payload = {"loss": float("nan"), "rows": [1.5, float("inf"), (float("-inf"), 2)], "ok": 3}
    expected = {"loss": None, "rows": [1.5, None, [None, 2]], "ok": 3}
    write_json(tmp_path / "a.json", payload)
    assert _strict_loads((tmp_path / "a.json").read_text()) == expected
    write_jsonl(tmp_path / "a.jsonl", [payload, {"x": float("nan")}])
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [_strict_loads(line) for line in lines] == [expected, {"x": None}]
    print_json(payload)
    assert _strict_loads(capsys.readouterr().out) == expected
