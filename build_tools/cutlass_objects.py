"""The torch-free CUTLASS sm90 translation units (csrc/ffn/cuda/cutlass/*.cu) as stamped objects.

They take ~2 min of CPU each in nvcc (far more wall time on a busy machine), so they can be prebuilt
(scripts/prebuild_cutlass.py) and linked.  One source of truth for how they are compiled:
cutlass_nvcc_flags() and build_cutlass_objects(), used by setup.py and the script.  An object is used
only when its stamp (sha256 of the object, of its .cu and every header it includes from csrc/, the
nvcc flags, the nvcc release, the CUTLASS version where headers are installed) matches this checkout.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import time

from .toolchain import cuda_archs, env_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTLASS_SOURCES = "csrc/ffn/cuda/cutlass/*.cu"
NVCC_OPT_FLAGS = ["-O3", "-std=c++20", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"]
_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def cutlass_nvcc_flags():
    """nvcc flags of the CUTLASS objects: sm_90a only (the kernels use wgmma/TMA), no torch defines."""
    return NVCC_OPT_FLAGS + ["-gencode", "arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC"]


def cutlass_sources(root: str = ROOT):
    return sorted(glob.glob(os.path.join(root, CUTLASS_SOURCES)))


def cutlass_includes():
    """CUTLASS 3.x include dirs (FASTENC_CUTLASS_DIR, else the nvidia-cutlass wheel), or None."""
    root = os.environ.get("FASTENC_CUTLASS_DIR")
    if root:
        dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    else:
        try:
            import cutlass_library
        except ImportError:
            return None
        src = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
        dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
    return dirs if os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")) else None


def nvcc_release(nvcc: str):
    """("13.0", "V13.0.88") from `nvcc --version`."""
    out = subprocess.check_output([nvcc, "--version"], text=True)
    m = re.search(r"release (\d+\.\d+), (V[\w.]+)", out)
    if not m:
        raise RuntimeError(f"cannot read the CUDA release from `{nvcc} --version`:\n{out}")
    return m.group(1), m.group(2)


def source_dependencies(source: str, root: str = ROOT):
    """The source and every file it includes with #include "..." (transitively), resolved next to
    the including file or in csrc/ (the -I of the build); <...> includes (CUDA, CUTLASS) are not ours."""
    seen, todo = [], [os.path.abspath(source)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for inc in _QUOTED_INCLUDE.findall(text):
            for base in (os.path.dirname(path), os.path.join(root, "csrc")):
                cand = os.path.normpath(os.path.join(base, inc))
                if os.path.isfile(cand):
                    todo.append(cand)
                    break
    return sorted(os.path.relpath(p, root) for p in seen)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cutlass_version(include_dirs):
    """"4.2.0" from cutlass/version.h in the first include dir that has it, else None."""
    for d in include_dirs or ():
        path = os.path.join(d, "cutlass", "version.h")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
            return ".".join(m.group(1) for m in parts) if all(parts) else None
    return None


def cutlass_stamp(source: str, nvcc_rel: str, root: str = ROOT, flags=None, cutlass_ver=None):
    """What an object of `source` was built from; compared key by key by stamp_mismatch().
    cutlass_ver is None where no CUTLASS headers are installed (a GPU image): then not compared."""
    deps = source_dependencies(source, root)
    h = hashlib.sha256()
    for rel in deps:
        h.update(rel.encode() + b"\0" + sha256_file(os.path.join(root, rel)).encode() + b"\0")
    return {"source": os.path.relpath(os.path.abspath(source), root), "inputs": deps, "inputs_sha256": h.hexdigest(),
            "flags": list(cutlass_nvcc_flags() if flags is None else flags), "nvcc_release": nvcc_rel,
            "cutlass_version": cutlass_ver}


def object_path(out_dir: str, source: str) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".o")


def stamp_mismatch(obj: str, expected: dict):
    """None if `obj` and its `obj.stamp.json` match `expected` (a cutlass_stamp()), else why not."""
    stamp_file = obj + ".stamp.json"
    if not os.path.isfile(obj):
        return f"no object {obj}"
    if not os.path.isfile(stamp_file):
        return f"no stamp {stamp_file}"
    try:
        with open(stamp_file, encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable stamp {stamp_file}: {e}"
    if stamp.get("object_sha256") != sha256_file(obj):
        return f"{obj} is not the object its stamp describes (modified or truncated)"
    for key, what in (("source", "source"), ("inputs_sha256", "sources"), ("flags", "nvcc flags"),
                      ("nvcc_release", "nvcc release")):
        if stamp.get(key) != expected[key]:
            if key == "inputs_sha256":
                old, new = stamp.get("inputs", []), expected["inputs"]
                detail = "; files: " + ", ".join(new) if old == new else f"; files {old} -> {new}"
                return f"{expected['source']}: its sources changed since the object was built{detail}"
            return f"{expected['source']}: {what} changed: {stamp.get(key)!r} -> {expected[key]!r}"
    if expected.get("cutlass_version") is not None and stamp.get("cutlass_version") != expected["cutlass_version"]:
        return (f"{expected['source']}: CUTLASS headers changed: {stamp.get('cutlass_version')!r} -> "
                f"{expected['cutlass_version']!r}")
    return None


def write_stamp(obj: str, stamp: dict, extra: dict) -> None:
    data = {**stamp, **extra, "object_sha256": sha256_file(obj)}
    tmp = obj + ".stamp.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, obj + ".stamp.json")


def build_cutlass_objects(out_dir: str, sources, include_dirs, nvcc: str, jobs: int = 2, root: str = ROOT, log=print):
    """Compile each source into out_dir/<name>.o (+ .stamp.json) unless a matching object is there;
    at most `jobs` nvcc at a time.  Returns the object paths in source order."""
    os.makedirs(out_dir, exist_ok=True)
    rel, version = nvcc_release(nvcc)
    cutlass_ver = cutlass_version(include_dirs)
    extra = {"nvcc_version": version, "cutlass_include": list(include_dirs),
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    objs, todo = [], []
    for src in sources:
        obj, stamp = object_path(out_dir, src), cutlass_stamp(src, rel, root, cutlass_ver=cutlass_ver)
        objs.append(obj)
        why = stamp_mismatch(obj, stamp)
        if why is None:
            log(f"fastenc: CUTLASS object up to date: {obj}")
        else:
            log(f"fastenc: CUTLASS object to (re)build: {why}")
            todo.append((src, obj, stamp))
    running = []

    def reap():
        for item in list(running):
            proc, src, obj, stamp, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                for other in running:
                    other[0].kill()
                raise RuntimeError(f"nvcc failed on {src} (exit {proc.returncode}); command: {' '.join(proc.args)}")
            write_stamp(obj, stamp, extra)
            log(f"fastenc: compiled {os.path.relpath(src, root)} -> {obj} in {time.time() - t0:.0f} s")

    for src, obj, stamp in todo:
        while len(running) >= max(1, jobs):
            reap()
            time.sleep(0.5)
        cmd = [nvcc, "-c", src, "-o", obj, "-I", os.path.join(root, "csrc")]
        cmd += [f for d in include_dirs for f in ("-I", d)] + cutlass_nvcc_flags()
        log(f"fastenc: {' '.join(cmd)}")
        if os.path.exists(obj + ".stamp.json"):
            os.remove(obj + ".stamp.json")  # a failed compile must not leave an old stamp next to a new object
        running.append((subprocess.Popen(cmd), src, obj, stamp, time.time()))
    while running:
        reap()
        time.sleep(0.5)
    return objs


def plan_cutlass(sources, prebuilt_dir, nvcc_rel: str, include_dirs, root: str = ROOT):
    """How to get each CUTLASS object: ({source: prebuilt object}, [sources to compile], [reasons]).
    include_dirs: the CUTLASS headers, or None where there are none.

    Raises RuntimeError (the reasons) when some object must be compiled but there are no headers."""
    cutlass_ver = cutlass_version(include_dirs)
    prebuilt, compile_, reasons = {}, [], []
    for src in sources:
        why = "FASTENC_CUTLASS_PREBUILT is not set"
        if prebuilt_dir:
            obj = object_path(prebuilt_dir, src)
            why = stamp_mismatch(obj, cutlass_stamp(src, nvcc_rel, root, cutlass_ver=cutlass_ver))
            if why is None:
                prebuilt[src] = obj
                continue
        compile_.append(src)
        reasons.append(why)
    if compile_ and include_dirs is None:
        raise RuntimeError("; ".join(reasons) + "; and no CUTLASS headers to compile from "
                           "(pip install nvidia-cutlass, or set FASTENC_CUTLASS_DIR)")
    return prebuilt, compile_, reasons


def _banner(msg: str) -> None:
    print("=" * 78 + f"\nfastenc: {msg}\n" + "=" * 78, file=sys.stderr, flush=True)


def cutlass_plan(nvcc_rel: str):
    """(prebuilt objects, sources to compile, include dirs) of the CUTLASS sm90 kernels, or None
    (built without them; the reason is printed)."""
    if env_flag("FASTENC_NO_CUTLASS"):
        return None
    if "90a" not in cuda_archs():
        print("fastenc: FASTENC_CUDA_ARCHS lacks 90a: no CUTLASS sm90 kernels", flush=True)
        return None
    includes = cutlass_includes()
    prebuilt_dir = os.environ.get("FASTENC_CUTLASS_PREBUILT")
    prebuilt_dir = os.path.abspath(prebuilt_dir) if prebuilt_dir else None
    try:
        prebuilt, to_compile, reasons = plan_cutlass(cutlass_sources(), prebuilt_dir, nvcc_rel, includes)
    except RuntimeError as e:
        _banner(f"building WITHOUT the CUTLASS sm90 kernels: {e}")
        return None
    for obj in prebuilt.values():
        print(f"fastenc: CUTLASS: linking prebuilt {obj}", flush=True)
    for src, why in zip(to_compile, reasons):
        print(f"fastenc: CUTLASS: compiling {os.path.relpath(src, ROOT)} from source ({why})", flush=True)
    return list(prebuilt.values()), to_compile, includes or []
