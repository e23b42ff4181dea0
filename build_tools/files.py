"""Writing generated build files: rewritten only when their text changes, so ninja rebuilds their users only then."""
from __future__ import annotations

import os


def write_if_changed(path: str, text: str) -> str:
    """Writes `text` to `path` (atomically, creating its folder) unless the file already holds it; returns path."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def ninja_path(p: str) -> str:
    """`p` escaped for a ninja build line."""
    return p.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")
