"""Where a command's results go: a bad location is refused before the work, and every file
is written whole (through :func:`resunit.atomic.atomic_path`) or not at all; reading them
back (:func:`read_jsonl`) names a damaged file and line instead of raising a traceback.

A command that trains or analyses for minutes checks where it will write first
(:func:`check_output_location`, :func:`prepare_output_dir`, :func:`prepare_output_file`), so a
typo costs a second, not the run; the writers below turn the ``OSError`` of a full disk or a
missing permission into a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from resunit.atomic import atomic_path
from resunit.errors import ConfigError

# The way out of a refused output directory, in the words of both the API and the CLI.
CHOOSE_ANOTHER_OUT = "choose another output directory (out=, or --out)"


def check_output_location(path: str | os.PathLike[str], option: str, kind: str = "file") -> None:
    """Refuse, without creating anything, an output ``path`` (a ``kind``: ``"file"`` or
    ``"directory"``) that can never be written: one of the other kind, or one below a file."""
    path = Path(path)
    try:
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{option} {path} is a directory; give a file name")
        if kind == "directory" and path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file; give a directory")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{option} {path} is below {parent}, which is a file")
                break
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"{option} {path} cannot be used: {reason(exc)}") from None


def prepare_output_dir(
    out_dir: str | os.PathLike[str], files: Sequence[str] = (), option: str = "--out"
) -> Path:
    """Create ``out_dir`` if needed and make sure ``files`` can be written into it.

    Raises :class:`ConfigError` when ``out_dir`` is a file, lies under a file, cannot be
    created or written, or when one of ``files`` is a directory there.
    """
    out = Path(out_dir)
    check_output_location(out, option, kind="directory")
    try:
        _create_writable(out)
    except OSError as exc:
        raise ConfigError(f"cannot write to {option} {out}: {reason(exc)}") from None
    refuse_directories_where_files_go(
        (out / name for name in files), "the command", f"move it away or give another {option}"
    )
    return out


def refuse_directories_where_files_go(paths: Iterable[Path], writer: str, fix: str) -> None:
    """Raise :class:`ConfigError` for the first of ``paths`` that is a directory: ``writer``
    (``"the run"``) would fail to write its file there, maybe after minutes of work. ``fix``
    tells the user the way out."""
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"{path} is a directory where {writer} writes a file; {fix}")


def prepare_output_file(path: str | os.PathLike[str], option: str) -> Path:
    """Make sure ``path`` can be written before any work: not a directory, its folder created
    if needed and writable. Raises :class:`ConfigError` otherwise."""
    out = Path(path)
    if not str(path).strip():
        raise ConfigError(f"{option} needs a file name, got {str(path)!r}")
    check_output_location(out, option)
    try:
        _create_writable(out.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {option} {out}: {reason(exc)}") from None
    return out


def _create_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write a file in it; raises the ``OSError`` if not."""
    folder.mkdir(parents=True, exist_ok=True)
    # Only writing tells: permissions, ACLs, read-only mounts and root all play a part.
    with tempfile.TemporaryFile(dir=folder):
        pass


@contextlib.contextmanager
def folders_removed_on_failure(path: str | os.PathLike[str]) -> Iterator[None]:
    """Around work that creates the folder ``path`` (and parents it lacks): if the work fails,
    the folders it created are removed again where they are still empty, so a failed command
    leaves no trace of them."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], what: str = "") -> Iterator[Path]:
    """:func:`resunit.atomic.atomic_path` for a command's result: the ``OSError`` of a full
    disk or a missing permission becomes a one-line :class:`ConfigError` ("cannot write
    [what ]PATH: reason")."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except OSError as exc:
        raise ConfigError(
            f"cannot write {what + ' ' if what else ''}{path}: {reason(exc)}"
        ) from None


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; a reader never sees half of it."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_text(
    payload: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None
) -> str:
    """``payload`` as strict JSON. NaN and ±inf (the loss of a diverged model) become
    ``null``: Python's own ``NaN`` token is not JSON, and jq or a browser refuse the file."""
    return json.dumps(_finite(payload), indent=indent, default=default, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented strict JSON (see :func:`json_text`), atomically."""
    return write_text(path, json_text(payload, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically (a whole log, e.g. on resume)."""
    return write_text(path, "".join(json_text(r) + "\n" for r in records))


def reason(exc: OSError) -> str:
    """What went wrong, without the path (the message names it once): ``Permission denied``."""
    return exc.strerror or str(exc)


def read_text(path: Path) -> str:
    """The UTF-8 text of a result file; a file that is not text, or cannot be read, is a
    :class:`ConfigError` saying so (a damaged run directory, not a traceback)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; the run directory is damaged") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {reason(exc)}") from None


def read_jsonl(path: str | os.PathLike[str], numbers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, [] when there is none. A bad line, or one whose
    fields named in ``numbers`` are not all numbers, is a :class:`ConfigError` naming the
    file and the line number."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path} line {number} is not a JSON object")
        missing = [k for k in numbers if not isinstance(record.get(k), (int, float))]
        if missing:
            raise ConfigError(f"{path} line {number} lacks {', '.join(missing)}")
        records.append(record)
    return records


__all__ = [
    "CHOOSE_ANOTHER_OUT",
    "atomic_output",
    "check_output_location",
    "folders_removed_on_failure",
    "json_text",
    "prepare_output_dir",
    "prepare_output_file",
    "read_jsonl",
    "read_text",
    "reason",
    "refuse_directories_where_files_go",
    "write_json",
    "write_jsonl",
    "write_text",
]
