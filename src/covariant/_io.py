"""Result files: one JSON writer and reader, and atomic writers built on one :func:`atomic_write`.

:func:`to_jsonable` turns results into plain JSON data (tensors and NumPy arrays become lists,
objects with ``to_dict()`` become dicts, tuples become lists, keys become strings).
:func:`atomic_write` writes to a temporary file in the destination folder, fsyncs, gives it a
normal file's mode and renames it over the destination, so a reader (or a resumed run) never
sees a half-written file, even if the writer is killed. The JSON, text, ``.npz``, figure and
``torch.save`` writers all go through it.

Strict JSON. Every JSON text covariant writes (files and ``--json`` on stdout) goes through
:func:`dumps_json` and is strict (RFC 8259): ``NaN``, ``Infinity`` and ``-Infinity`` never
appear. Non-finite floats are written as ``null`` and *flagged* (the default,
``nonfinite="flag"``): the top-level object gets a key ``"nonfinite"`` mapping the JSON
Pointer (RFC 6901) of each such ``null`` to ``"inf"``, ``"-inf"`` or ``"nan"``, e.g.
``{"x": [1.0, null], "nonfinite": {"/x/1": "-inf"}}``. The key is only there when something
was flagged. :func:`loads_json` / :func:`read_json` parse strictly and put the flagged values
back, so a document round-trips to the same floats (−inf stays −inf). Other policies:
``"null"`` (``null`` without a flag), ``"string"`` (``"inf"``, ``"-inf"``, ``"nan"``) and
``"error"`` (refuse, naming the pointer).

Example
-------
>>> import math, os, tempfile, torch
>>> to_jsonable({"x": torch.tensor([1.0, 2.0]), 3: (math.inf, 0.5)}, nonfinite="null")
{'x': [1.0, 2.0], '3': [None, 0.5]}
>>> path = atomic_write_json(os.path.join(tempfile.mkdtemp(), "r.json"), {"a": [1.0, -math.inf]})
>>> print(path.read_text().strip())
{
  "a": [
    1.0,
    null
  ],
  "nonfinite": {
    "/a/1": "-inf"
  }
}
>>> read_json(path)
{'a': [1.0, -inf]}
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
    "NONFINITE_KEY",
    "atomic_save_torch",
    "atomic_savez",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "dumps_json",
    "loads_json",
    "read_json",
    "remove_stale_temporaries",
    "save_figure",
    "to_jsonable",
]

#: Non-finite floats in memory (:func:`to_jsonable`).
NonFinite = Literal["keep", "null", "string"]
#: Non-finite floats in JSON text (:func:`dumps_json`): always strict JSON.
StrictNonFinite = Literal["flag", "null", "string", "error"]
#: Top-level key of a JSON document that lists its flagged non-finite numbers.
NONFINITE_KEY = "nonfinite"


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


def _pointer_token(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _flag_nonfinite(x: Any, pointer: str, flags: dict[str, str]) -> Any:
    """A copy of the JSON data ``x`` with non-finite floats as None, their pointers in flags."""
    if isinstance(x, dict):
        return {k: _flag_nonfinite(v, f"{pointer}/{_pointer_token(k)}", flags)
                for k, v in x.items()}
    if isinstance(x, list):
        return [_flag_nonfinite(v, f"{pointer}/{i}", flags) for i, v in enumerate(x)]
    if isinstance(x, float) and not math.isfinite(x):
        flags[pointer] = str(x)  # 'inf', '-inf' or 'nan'
        return None
    return x


def dumps_json(obj: Any, *, indent: int | None = 2, nonfinite: StrictNonFinite = "flag") -> str:
    """``obj`` as strict JSON text (through :func:`to_jsonable`), without a final newline.

    Non-finite floats follow ``nonfinite`` (module docstring): ``"flag"`` writes ``null`` and
    lists the value under the top-level key :data:`NONFINITE_KEY` (``obj`` must then be a
    mapping without that key), ``"null"`` and ``"string"`` replace them, ``"error"`` raises
    :class:`ValueError`. :func:`loads_json` reads the text back.

    Example
    -------
    >>> dumps_json({"a": (1, 2), "b": float("nan")}, indent=None)
    '{"a": [1, 2], "b": null, "nonfinite": {"/b": "nan"}}'
    >>> dumps_json({"b": float("inf")}, nonfinite="error")
    Traceback (most recent call last):
    ...
    ValueError: non-finite number inf at /b: strict JSON has no inf (nonfinite='error')
    """
    if nonfinite not in ("flag", "null", "string", "error"):
        raise ValueError(f"nonfinite must be 'flag', 'null', 'string' or 'error' (strict "
                         f"JSON), got {nonfinite!r}")
    if nonfinite in ("null", "string"):
        data = to_jsonable(obj, nonfinite=nonfinite)
    else:
        flags: dict[str, str] = {}
        data = _flag_nonfinite(to_jsonable(obj), "", flags)
        if flags and nonfinite == "error":
            where, what = next(iter(flags.items()))
            raise ValueError(f"non-finite number {what} at {where or '/'}: strict JSON has no "
                             f"{what} (nonfinite='error')")
        if isinstance(data, dict) and NONFINITE_KEY in data:
            raise ValueError(f"the key {NONFINITE_KEY!r} is reserved for the flags of "
                             "non-finite numbers")
        if flags and not isinstance(data, dict):
            raise ValueError("non-finite numbers are flagged in a top-level object; wrap the "
                             "data in a dict, or pass nonfinite='null' or 'string'")
        if flags:
            data = {**data, NONFINITE_KEY: flags}
    return json.dumps(data, indent=indent, allow_nan=False)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name} (covariant writes null and a flag instead)")


def _set_pointer(data: Any, pointer: str, value: float) -> None:
    *path, last = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    node = data
    for token in path:
        node = node[int(token)] if isinstance(node, list) else node[token]
    key: str | int = int(last) if isinstance(node, list) else last
    if node[key] is not None:
        raise ValueError(f"flag {pointer!r} does not point at a null")
    node[key] = value


def loads_json(text: str) -> Any:
    """Parse strict JSON (``NaN`` / ``Infinity`` are refused) and restore the non-finite
    numbers that :func:`dumps_json` flagged; the flag key is removed.

    Example
    -------
    >>> loads_json('{"x": [null, 2.0], "nonfinite": {"/x/0": "-inf"}}')
    {'x': [-inf, 2.0]}
    """
    data = json.loads(text, parse_constant=_refuse_constant)
    if isinstance(data, dict) and isinstance(data.get(NONFINITE_KEY), dict):
        flags = data.pop(NONFINITE_KEY)
        try:
            for pointer, what in flags.items():
                _set_pointer(data, pointer, float(what))
        except (KeyError, IndexError, TypeError) as err:
            raise ValueError(f"bad non-finite flag in JSON: {err!r}") from None
    return data


def read_json(path: str | os.PathLike[str]) -> Any:
    """:func:`loads_json` of the UTF-8 file at ``path``."""
    return loads_json(Path(path).read_text(encoding="utf-8"))


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
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
    nonfinite: StrictNonFinite = "flag",
) -> Path:
    """Write ``obj`` as strict JSON (:func:`dumps_json`, plus a final newline) atomically;
    :func:`read_json` reads it back."""
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
