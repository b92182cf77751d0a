"""Build and load ``native/onednn_plan.cpp`` against the oneDNN of the ``onednn`` extra.

PyTorch carries its own oneDNN inside ``libtorch_cpu`` but exports none of its symbols, so a
plan of oneDNN primitives links the library that Intel publishes on PyPI instead
(``onednn-cpu-gomp`` with its headers in ``onednn-devel-cpu-gomp``). That build uses GNU
OpenMP, the runtime PyTorch itself loads (``libgomp.so.1``): the process keeps one thread pool,
and ``torch.set_num_threads`` speaks for both. (Intel's other builds, ``onednn-cpu-iomp`` and
``onednn-cpu-tbb``, would bring a second thread pool, and two pools on two cores take turns
spinning.) It is oneDNN 3.2, from 2023: the newest build of that kind on PyPI.

The library is compiled once per source, compiler, flags and oneDNN (a few seconds with the
C++ compiler that ``torch.compile`` needs too) into the user's cache folder.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from resunit.errors import ConfigError

SOURCE = Path(__file__).with_name("native") / "onednn_plan.cpp"
ONEDNN_PACKAGES = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
INSTALL_HINT = (
    "install resunit's 'onednn' extra, for Linux on x86-64: pip install 'resunit[onednn]'"
)


def _installed_file(package: str, name: str) -> Path:
    """The file called ``name`` that the pip package ``package`` installed."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"oneDNN is not installed: {INSTALL_HINT}") from None
    for file in files:
        if file.name == name:
            return Path(str(file.locate())).resolve()
    raise ConfigError(f"the {package} package has no {name}; reinstall it: {INSTALL_HINT}")


def _compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX`` (which may carry arguments, as ``ccache g++``)."""
    command = shlex.split(os.environ.get("CXX", ""))
    if not command:
        found = shutil.which("c++") or shutil.which("g++")
        command = [found] if found else []
    if not command:
        raise ConfigError("no C++ compiler found (set CXX, or install g++)")
    return command


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "resunit" / "native"


# -fopenmp: the plan sets the caller's thread count with omp_set_num_threads.
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]


def load_onednn_plan_library() -> ctypes.CDLL:
    """The compiled plan library, built on first use; :class:`ConfigError` if it cannot be.

    A failure is remembered: later calls repeat its message without compiling again.
    """
    library = _load_once()
    if isinstance(library, ConfigError):
        raise ConfigError(str(library))
    return library


@functools.lru_cache(maxsize=1)
def _load_once() -> ctypes.CDLL | ConfigError:
    try:
        header = _installed_file(ONEDNN_PACKAGES[1], "dnnl.hpp")
        library = _installed_file(ONEDNN_PACKAGES[0], "libdnnl.so.3")
        compiler = _compiler()
        versions = [importlib.metadata.version(p) for p in ONEDNN_PACKAGES]
        source = SOURCE.read_bytes()
        identity = (source, compiler, _version(compiler), FLAGS, str(library), versions)
        key = hashlib.sha256(repr(identity).encode()).hexdigest()
        target = _cache_folder() / f"onednn_plan-{key[:16]}.so"
        if not target.exists():
            _build(compiler, header.parent, library.parent, target)
        return _declare(ctypes.CDLL(str(target)))
    except ConfigError as exc:
        return exc
    except OSError as exc:  # an unwritable cache, a compiler that will not start, a bad file
        return ConfigError(f"the oneDNN plan library could not be built or loaded: {exc}")


def _version(compiler: list[str]) -> str:
    result = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=False)
    return (result.stdout or result.stderr).strip().split("\n")[0]


def _build(compiler: list[str], include: Path, library_folder: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: concurrent first uses never load half a file.
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    # -isystem keeps oneDNN's own warnings out; the rpath finds it without LD_LIBRARY_PATH.
    command = [
        *compiler, *FLAGS, str(SOURCE), "-isystem", str(include), "-L", str(library_folder),
        "-ldnnl", f"-Wl,-rpath,{library_folder}", "-o", temporary,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ConfigError(f"building the oneDNN plan library failed: {_first_error(result)}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _first_error(result: subprocess.CompletedProcess[str]) -> str:
    # A compiler's first line is often context ("In member function …"); the error follows.
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    return (errors or lines or [f"exit status {result.returncode}"])[0].strip()


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give every exported function its C signature (ctypes would guess ints otherwise)."""
    p, i, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    i64s = ctypes.POINTER(ctypes.c_int64)
    signatures = {
        "plan_new": (p, []),
        "plan_free": (None, [p]),
        "plan_error": (ctypes.c_char_p, [p]),
        "plan_input": (i, [p, i, i64, i64, i64, i64, i]),
        "plan_convolution": (i, [p, i, i, p, p, i64, i64, i64, i64s, i64s, i64s, i64s, i, i]),
        "plan_batch_norm": (i, [p, i, i, p, p, p, p, f32, i]),
        "plan_add": (i, [p, i, i, i, i]),
        "plan_relu": (i, [p, i, i]),
        "plan_pool": (i, [p, i, i, i, i64s, i64s, i64s, i64s]),
        "plan_linear": (i, [p, i, i, p, p, i64, i64, i]),
        "plan_release": (i, [p, i]),
        "plan_finish": (i, [p, i, i64s, ctypes.POINTER(ctypes.c_int)]),
        "plan_run": (i, [p, p, p, i]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(lib, name)
        function.restype = result
        function.argtypes = arguments
    return lib


__all__ = ["ONEDNN_PACKAGES", "load_onednn_plan_library"]
