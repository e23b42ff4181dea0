"""Hard-links an installed distribution and everything it requires from this environment into another one.

    python -m build_tools.link_installed "torch==2.14.1" --into ENV/lib/python3.11/site-packages

`scripts/run.sh wheel` tests the wheel in a fresh environment; the pinned CUDA build of torch with its nvidia-*
and triton wheels is 5.3 GB installed, and a second copy of it filled CI's disk. The files linked here are those
pip unpacked from the same pinned wheels into the build environment (each distribution's RECORD, metadata
included), so pip in the fresh environment finds the requirement met and installs the rest itself.  Files a
RECORD places outside site-packages (console scripts, whose first line names this environment's python) are
left out.  Both environments must be on one file system (a hard link cannot cross one): otherwise this fails and
says so.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(requirement: str) -> list[metadata.Distribution]:
    """The installed distributions `requirement` needs here: itself, then what each requires (with the extras
    asked for), following markers for this interpreter; raises if one is missing or its version does not match."""
    found: dict[str, metadata.Distribution] = {}
    extras_done: set[tuple[str, str]] = set()
    todo = [Requirement(requirement)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"link_installed: {req} is required but not installed in {sys.prefix}") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"link_installed: {req} is required but {dist.version} is installed")
        found[name] = dist
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in extras_done:
                continue
            extras_done.add((name, extra))
            for line in dist.requires or ():
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):  # `extra == "x"`: only with x
                    todo.append(sub)
    return list(found.values())


def link(dists: list[metadata.Distribution], into: str) -> tuple[int, int]:
    """Hard-links each distribution's files into the site-packages folder `into`; returns (files, bytes)."""
    count = size = 0
    for dist in dists:
        site = os.path.realpath(str(dist.locate_file("")))
        for entry in dist.files or ():
            src = os.path.realpath(str(dist.locate_file(entry)))
            if os.path.commonpath([site, src]) != site or not os.path.isfile(src):
                continue  # outside site-packages (console scripts) or listed but absent (.pyc not yet written)
            dst = os.path.join(into, os.path.relpath(src, site))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.lexists(dst):
                os.remove(dst)
            try:
                os.link(src, dst)
            except OSError as e:
                raise SystemExit(f"link_installed: cannot hard-link {src} to {dst} ({e}); the two environments "
                                 "must be on one file system") from None
            count += 1
            size += os.path.getsize(src)
    return count, size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("requirement", help='what to link, with its version, e.g. "torch==2.14.1"')
    p.add_argument("--into", required=True, help="the other environment's site-packages folder")
    a = p.parse_args(argv)
    if not os.path.isdir(a.into):
        raise SystemExit(f"link_installed: --into {a.into!r} is not a folder")
    dists = closure(a.requirement)
    files, size = link(dists, a.into)
    print(f"fastenc: linked {a.requirement} and {len(dists) - 1} distributions it needs ({files} files, "
          f"{size / 1e9:.1f} GB not copied) into {a.into}")


if __name__ == "__main__":
    main()
