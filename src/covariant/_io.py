"""Result files: one JSON sanitizer and atomic writers built on one :func:`atomic_write`.

:func:`to_jsonable` turns results into plain JSON data (tensors and NumPy arrays become lists,
objects with ``to_dict()`` become dicts, tuples become lists, keys become strings).
:func:`atomic_write` writes to a temporary file in the destination folder, fsyncs, gives it a
normal file's mode and renames it over the destination, so a reader (or a resumed run) never
sees a half-written file, even if the writer is killed. The JSON, text, ``.npz``, figure and
``torch.save`` writers all go through it.

Non-finite floats: ``nonfinite="keep"`` (the default) writes them as the JSON extensions
``NaN`` / ``Infinity`` / ``-Infinity`` that Python's :mod:`json` reads back;
``nonfinite="null"`` writes ``null`` (strict JSON).

Example
-------
>>> import math, os, tempfile, torch
>>> to_jsonable({"x": torch.tensor([1.0, 2.0]), 3: (math.inf, 0.5)}, nonfinite="null")
{'x': [1.0, 2.0], '3': [None, 0.5]}
>>> path = atomic_write_json(os.path.join(tempfile.mkdtemp(), "r.json"), {"a": math.nan})
>>> path.read_text()
'{\\n  "a": NaN\\n}\\n'
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

__all__ = [
    "atomic_save_torch",
    "atomic_savez",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "dumps_json",
    "remove_stale_temporaries",
    "save_figure",
    "to_jsonable",
]

NonFinite = Literal["keep", "null", "string"]


def to_jsonable(x: Any, *, nonfinite: NonFinite = "keep") -> Any:
    """A JSON-ready copy of ``x``.

    Dicts (keys as ``str``), lists and tuples (as lists) are copied recursively; tensors and
    NumPy arrays become nested lists, NumPy scalars and 0-d objects with ``item()`` Python
    numbers, objects with ``to_dict()`` their dict. Non-finite floats stay (``"keep"``),
    become ``None`` (``"null"``, for strict JSON) or the strings ``"inf"``, ``"-inf"``,
    ``"nan"`` (``"string"``).

    Example
    -------
    >>> import numpy as np
    >>> to_jsonable({"a": np.float64(0.5), "b": [np.arange(2), float("nan")]})
    {'a': 0.5, 'b': [[0, 1], nan]}
    """
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v, nonfinite=nonfinite) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v, nonfinite=nonfinite) for v in x]
    if isinstance(x, float):  # before the checks below: np.float64 is a float
        x = float(x)
        if math.isfinite(x) or nonfinite == "keep":
            return x
        return None if nonfinite == "null" else str(x)
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.detach().cpu().tolist(), nonfinite=nonfinite)
    if isinstance(x, np.ndarray | np.generic):
        return to_jsonable(x.tolist(), nonfinite=nonfinite)
    if hasattr(x, "to_dict"):
        return to_jsonable(x.to_dict(), nonfinite=nonfinite)
    if hasattr(x, "item"):
        return to_jsonable(x.item(), nonfinite=nonfinite)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def dumps_json(obj: Any, *, indent: int = 2, nonfinite: NonFinite = "keep") -> str:
    """``obj`` as indented JSON text (through :func:`to_jsonable`), without a final newline.

    Example
    -------
    >>> dumps_json({"a": (1, 2)}, indent=None)
    '{"a": [1, 2]}'
    """
    return json.dumps(to_jsonable(obj, nonfinite=nonfinite), indent=indent,
                      allow_nan=nonfinite == "keep")


def _file_mode() -> int:
    """The mode ``open`` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: A temporary file older than this (seconds) was left by a writer that was killed.
STALE_TMP_SECONDS = 300.0


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files that killed writers of ``path`` left behind.

    Only files older than :data:`STALE_TMP_SECONDS` go, so a writer that is still running is
    never disturbed. Returns the removed paths.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    now, removed = time.time(), []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file next to ``path``, fsync, then rename.

    The folder is created; the temporary file is removed if ``write`` raises, and temporary
    files of ``path`` left by a killed writer are removed first
    (:func:`remove_stale_temporaries`).

    Example
    -------
    >>> import os, tempfile
    >>> p = atomic_write(os.path.join(tempfile.mkdtemp(), "a", "b.bin"), lambda f: f.write(b"x"))
    >>> p.read_bytes(), sorted(os.listdir(p.parent))
    (b'x', ['b.bin'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int = 2, nonfinite: NonFinite = "keep"
) -> Path:
    """Write ``obj`` as JSON (:func:`dumps_json`, plus a final newline) atomically."""
    return atomic_write_text(path, dumps_json(obj, indent=indent, nonfinite=nonfinite) + "\n")


def atomic_savez(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """``numpy.savez(path, **arrays)`` atomically (``path`` is used as given)."""
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def atomic_save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def save_figure(
    fig: Any, path: str | os.PathLike[str], *, dpi: int = 120, bbox_inches: str | None = "tight"
) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi,
                                                     bbox_inches=bbox_inches))
