"""Atomic result files: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) never sees a half-written file, even if the writer is killed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file next to ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (tensors become lists)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_default) + "\n")


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120,
                                                     bbox_inches="tight"))


def _default(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
