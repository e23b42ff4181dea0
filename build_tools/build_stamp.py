"""Skip `pip install -e .` when no input of the build changed, never when one did (scripts/run.sh).

    python -m build_tools.build_stamp check STAMP   # exit 0: up to date; else says why, exit 1
    python -m build_tools.build_stamp commit STAMP  # after a successful install

The inputs: every file under csrc/ and build_tools/, setup.py, pyproject.toml, fastenc/constants.py (the source of
the generated fastenc_constants.h), requirements/; the build's
environment variables (toolchain.BUILD_ENV) and the CPU capabilities they resolve to with this compiler; the Python
interpreter; the versions of torch, setuptools, pybind11 and the nvidia-* wheels (cuBLAS, CUTLASS); nvcc and the
C++ compiler (their --version); the prebuilt CUTLASS stamps.  The outputs: the fastenc distribution installed in
this interpreter (editable, from this folder) and the sha256 of each fastenc/_C*.so.  `check` compares both and, on
a mismatch, deletes STAMP and records the current inputs in STAMP.pending for `commit` (inputs read before the
build: an edit made while it runs is seen by the next check).
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

from .cutlass_objects import ROOT, sha256_file
from .cpu_kernels import build_capabilities
from .toolchain import BUILD_ENV

INPUT_FILES = ("setup.py", "pyproject.toml", "fastenc/constants.py")
INPUT_DIRS = ("csrc", "build_tools", "requirements")
_PACKAGES = ("torch", "setuptools", "pybind11")  # and every nvidia-* distribution


def _files(root: str):
    paths = [os.path.join(root, f) for f in INPUT_FILES]
    for d in INPUT_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, d)):
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__")
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return {os.path.relpath(p, root): sha256_file(p) for p in paths if os.path.isfile(p)}


def _version_of(cmd):
    """[path, output of `cmd --version`] or None when cmd is not there."""
    path = shutil.which(cmd)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return [path, f"unusable: {e}"]
    return [path, out.strip()]


def _nvcc():
    """nvcc where torch.utils.cpp_extension looks: CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    home = home or "/usr/local/cuda"
    return _version_of(os.path.join(home, "bin", "nvcc"))


def inputs(root: str = ROOT) -> dict:
    try:
        caps = build_capabilities()
    except RuntimeError as e:  # a bad FASTENC_CPU_CAPABILITIES: the build reports it
        caps = [str(e)]
    packages = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in _PACKAGES or name.startswith("nvidia-"):
            packages[name] = dist.version
    prebuilt = os.environ.get("FASTENC_CUTLASS_PREBUILT")
    stamps = sorted(glob.glob(os.path.join(prebuilt, "*.stamp.json"))) if prebuilt else []
    return {"root": root, "files": _files(root), "env": {k: os.environ.get(k) for k in BUILD_ENV},
            "cpu_capabilities": caps, "python": [sys.executable, sys.version], "packages": dict(sorted(packages.items())),
            "nvcc": _nvcc(), "cxx": _version_of(os.environ.get("CXX", "c++")),
            "cutlass_prebuilt": {os.path.basename(s): sha256_file(s) for s in stamps}}


def outputs(root: str = ROOT) -> dict:
    try:
        dist = importlib.metadata.distribution("fastenc")
        installed = [dist.version, json.loads(dist.read_text("direct_url.json") or "null")]
    except importlib.metadata.PackageNotFoundError:
        installed = None
    so = sorted(glob.glob(os.path.join(root, "fastenc", "_C*.so")))
    return {"installed": installed, "extension": {os.path.relpath(p, root): sha256_file(p) for p in so}}


def _first_difference(old: dict, new: dict) -> str | None:
    for key in new:
        if old.get(key) == new[key]:
            continue
        if key == "files":
            a, b = old.get(key) or {}, new[key]
            changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            return "changed: " + ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return f"{key} changed: {old.get(key)!r} -> {new[key]!r}"
    return None


def check(stamp: str, root: str = ROOT) -> str | None:
    """None when STAMP matches the inputs and outputs here, else why not (then STAMP is gone and
    STAMP.pending holds the inputs for commit())."""
    new = inputs(root)
    try:
        with open(stamp, encoding="utf-8") as f:
            old = json.load(f)
        why = _first_difference(old["inputs"], new) or _first_difference(old["outputs"], outputs(root))
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"no usable stamp {stamp} ({e.__class__.__name__})"
    if why is not None:
        if os.path.exists(stamp):
            os.remove(stamp)
        _write(stamp + ".pending", new)
    return why


def commit(stamp: str, root: str = ROOT) -> None:
    with open(stamp + ".pending", encoding="utf-8") as f:
        pending = json.load(f)
    _write(stamp, {"inputs": pending, "outputs": outputs(root)})
    os.remove(stamp + ".pending")


def _write(path: str, data: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("check", "commit"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "commit":
        commit(argv[1])
        return 0
    why = check(argv[1])
    if why is not None:
        print(f"fastenc: (re)building the extension: {why}", flush=True)
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
