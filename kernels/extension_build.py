"""Configure and build the C++/CUDA extension with CMake into kernels/_build/ (see CMakeLists.txt).

Used by `tools/build_extension.py` and `kernels.extension.build()`. A build leaves a stamp (sources hash, torch
version, options) next to the library, so that a library built from other sources or for another torch is
recognised as stale instead of being loaded. A failed build leaves a one-line summary that
`kernels.extension.unavailable_reason()` reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent.parent
CSRC_DIR = SOURCE_DIR / "kernels" / "csrc"
BUILD_DIR = SOURCE_DIR / "kernels" / "_build"
CUDA_CHECK_DIR = BUILD_DIR / "cuda_check"  # the .cu syntax check's own build (a CPU-only torch)
STAMP_FILE = "stamp.json"  # what the library was built from: sources hash, torch version
CONFIGURE_FILE = "configure.json"  # the CMake arguments the folder is configured with
ERROR_FILE = "last_error.txt"
CUDA_MODES = ("auto", "on", "off")


def _write_file(path: Path, text: str) -> None:
    """Replace path atomically (temp file + os.replace): a killed build never leaves half a stamp. The ops floor
    imports nothing from the engine, so this small writer is its own."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict | list) -> None:
    _write_file(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class BuildError(RuntimeError):
    """The extension could not be built; the message is a one-line summary."""


def library_name() -> str:
    if sys.platform == "win32":
        return "cmvae_ext.dll"
    return "libcmvae_ext.dylib" if sys.platform == "darwin" else "libcmvae_ext.so"


def sources_digest() -> str:
    """sha256 over CMakeLists.txt and kernels/csrc/*; '' when the sources are not shipped (installed package)."""
    files = sorted(CSRC_DIR.glob("*")) if CSRC_DIR.is_dir() else []
    if not files:
        return ""
    h = hashlib.sha256()
    for f in [SOURCE_DIR / "CMakeLists.txt", *files]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def read_stamp(build_dir: Path = BUILD_DIR) -> dict:
    try:
        return json.loads((build_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def stale_reason(build_dir: Path = BUILD_DIR) -> str:
    """'' when the library in build_dir matches the current sources and torch, else why it does not."""
    stamp = read_stamp(build_dir)
    if not stamp:
        return "no build stamp (an interrupted or foreign build)"
    if stamp.get("torch") != torch.__version__:
        return f"built for torch {stamp.get('torch')}, this is torch {torch.__version__}"
    digest = sources_digest()
    if digest and stamp.get("sources") != digest:
        return "the C++/CUDA sources changed since it was built"
    return ""


def built_kinds(build_dir: Path = BUILD_DIR) -> str:
    """What the configured build holds, as CMake recorded it ("CPU ops only: torch is a CPU-only build")."""
    try:
        return (build_dir / "cuda_kernels.txt").read_text().strip()
    except OSError:
        return "unknown"


def _tool(name: str) -> str | None:
    """A build tool: $CMVAE_CMAKE / $CMVAE_NINJA when set, else the one installed next to this Python (the
    venv's cmake>=4 and ninja), else the first on PATH."""
    if chosen := os.environ.get(f"CMVAE_{name.upper()}"):
        return shutil.which(chosen)
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def find_cxx() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if found := shutil.which(name):
            return found
    return None


def _summary(output: str) -> str:
    """The first compiler or CMake error of a build log as one short line (a CMake error's message follows its
    'CMake Error at ...' line, indented)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith(" "):
                    break
                body.append(nxt.strip())
            return re.sub(r"\s+", " ", "CMake: " + " ".join(body))[:300]
        if re.search(r"\berror\b|FATAL", line):
            return re.sub(r"\s+", " ", line.strip())[:300]
    tail = [ln.strip() for ln in lines if ln.strip()]
    return (tail[-1] if tail else "no output")[:300]


@contextlib.contextmanager
def _locked(build_dir: Path) -> Iterator[None]:
    """Serialises builds of one folder across processes (pytest workers, a concurrent setup.sh)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, builds are not serialised
        yield
        return
    with open(build_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], verbose: bool) -> str:
    if verbose:
        print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BuildError(_summary(proc.stdout or "") if not verbose else f"{cmd[0]} failed (see the output above)")
    return proc.stdout or ""


def _generator_args(ninja: str | None) -> list[str]:
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def _tools() -> tuple[str, str | None]:
    if not (SOURCE_DIR / "CMakeLists.txt").is_file() or not CSRC_DIR.is_dir():
        raise BuildError(f"the extension sources are not here ({SOURCE_DIR / 'CMakeLists.txt'}); build from a "
                         "source checkout")
    cmake = _tool("cmake")
    if cmake is None:
        raise BuildError("no CMake found (pip install cmake)")
    if find_cxx() is None:
        cxx = os.environ.get("CXX")
        raise BuildError(f"the compiler CXX={cxx} is not found" if cxx
                         else "no C++ compiler found (install g++ or clang++, or set CXX)")
    return cmake, _tool("ninja")


def _configure_and_build(cmake: str, build_dir: Path, args: list[str], *, target: str | None, clean: bool,
                         verbose: bool) -> None:
    """Configures build_dir unless it already is with the same args, then builds target (default: all)."""
    try:
        previous = json.loads((build_dir / CONFIGURE_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    configured = (build_dir / "CMakeCache.txt").is_file()
    if clean or (configured and previous != args):
        # Another generator or other options: start from an empty folder (CMake cannot switch generators).
        keep = {".lock", CUDA_CHECK_DIR.name}
        for child in build_dir.iterdir():
            if child.name not in keep:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        configured = False
    (build_dir / STAMP_FILE).unlink(missing_ok=True)
    if not configured:
        _run([cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), *args], verbose)
        _write_json(build_dir / CONFIGURE_FILE, args)
    cmd = [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)]
    _run(cmd + (["--target", target] if target else []), verbose)


def build_library(*, verbose: bool = False, cuda: str = "auto", cuda_arch: str = "90", clean: bool = False,
                  build_dir: Path = BUILD_DIR) -> Path:
    """Configure (when needed) and build; returns the library path or raises BuildError with a summary.

    cuda: 'auto' builds the CUDA kernels when torch has CUDA and nvcc is found; 'on' requires them; 'off'.
    cuda_arch: CUDA architectures, CMake style ("90", "80;90").
    """
    if cuda not in CUDA_MODES:
        raise ValueError(f"cuda={cuda!r}: expected one of {CUDA_MODES}")
    cmake, ninja = _tools()
    args = [f"-DCMVAE_PYTHON={sys.executable}", f"-DCMVAE_WITH_CUDA={cuda.upper()}",
            f"-DCMVAE_CUDA_ARCHITECTURES={cuda_arch}", "-DCMAKE_BUILD_TYPE=Release", *_generator_args(ninja)]
    with _locked(build_dir):
        error_file = build_dir / ERROR_FILE
        digest = sources_digest()  # before building: edits made during the build must leave the result stale
        try:
            _configure_and_build(cmake, build_dir, args, target=None, clean=clean, verbose=verbose)
            path = build_dir / library_name()
            if not path.is_file():
                raise BuildError(f"the build finished without producing {path}")
        except BuildError as e:
            _write_file(error_file, f"{e}\n")
            raise
        error_file.unlink(missing_ok=True)
        _write_json(build_dir / STAMP_FILE, {"torch": torch.__version__, "sources": digest,
                                                   "cuda_torch": torch.version.cuda})
        return path


def check_cuda_sources(*, verbose: bool = False, cuda_arch: str = "90", build_dir: Path = CUDA_CHECK_DIR) -> Path:
    """Compiles the .cu files (one unity object, never linked) against this torch's headers with nvcc.

    Catches compile errors in the CUDA kernels where only a CPU-only torch is installed (which ships the c10/cuda
    headers but no CUDA libraries). Returns the object's folder; raises BuildError without nvcc or on an error.
    """
    cmake, ninja = _tools()
    if _tool("nvcc") is None and not os.environ.get("CUDACXX"):
        raise BuildError("no CUDA compiler (nvcc) found")
    args = [f"-DCMVAE_PYTHON={sys.executable}", "-DCMVAE_WITH_CUDA=OFF", "-DCMVAE_CUDA_SYNTAX_CHECK=ON",
            f"-DCMVAE_CUDA_ARCHITECTURES={cuda_arch}", "-DCMAKE_BUILD_TYPE=Release", *_generator_args(ninja)]
    with _locked(build_dir):
        _configure_and_build(cmake, build_dir, args, target="cmvae_ext_cuda_check", clean=False, verbose=verbose)
    return build_dir
