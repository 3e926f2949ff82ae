"""Checkpoints of the architectures in :mod:`covariant.zoo.architectures`.

:func:`save_checkpoint` stores a model with the recipe to rebuild it (architecture name and
constructor options) as plain data and tensors, so that :func:`load_checkpoint` reads it back
with ``torch.load(..., weights_only=True)``. A bare state dict loads too when the architecture
is named; a mismatch raises :class:`~covariant.errors.ArchitectureMismatchError` with the
missing / unexpected keys and a guess of what the weights look like.

Integrity: :func:`save_checkpoint` stores a SHA-256 of the recipe and the state tensors, and
:func:`load_checkpoint` recomputes it; it also verifies the CRC-32 of every member of the zip
container that ``torch.save`` writes. A file that is empty, truncated, corrupted, not written
by ``torch.save``, or that holds a whole pickled module raises :class:`CheckpointError`.
A missing path or a directory raises ``FileNotFoundError`` / ``IsADirectoryError``.
Checkpoints saved before the hash existed still load, with a ``UserWarning``.

Example
-------
>>> import os, tempfile, torch
>>> from covariant.zoo.architectures import build
>>> model = build("mlp", 4, 3, hidden=(5,))
>>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> save_checkpoint(path, model)
>>> again, meta = load_checkpoint(path)
>>> x = torch.ones(1, 4)
>>> meta["arch_kwargs"]["hidden"], bool(torch.equal(again(x), model(x)))
([5], True)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._io import atomic_save_torch
from ..errors import ArchitectureMismatchError, CheckpointError
from .architectures import ARCHITECTURES, build

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


_FORMAT = "covariant.checkpoint/1"
_PRIMITIVES = (type(None), bool, int, float, str)


def _check_primitive(value: Any, where: str) -> Any:
    """Return ``value`` with tuples turned into lists, or raise if it is not plain data."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_primitive(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where} has non-string keys; checkpoints store plain data only")
        return {k: _check_primitive(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(
        f"{where}={value!r} of type {type(value).__name__} cannot be stored in a checkpoint: "
        "use None, bool, int, float, str, or lists/dicts of those"
    )


def _build_quietly(arch: str, kwargs: Mapping[str, Any], device: str | None = None) -> nn.Module:
    """Build without consuming the global RNG (on the meta device when ``device='meta'``)."""
    kwargs = dict(kwargs)
    missing = [k for k in ("in_features", "num_classes") if k not in kwargs]
    if missing:
        raise ValueError(f"architecture kwargs lack {missing}; pass them, e.g. in_features=40")
    in_features, num_classes = kwargs.pop("in_features"), kwargs.pop("num_classes")
    with torch.random.fork_rng(devices=[]):
        if device is None:
            return build(arch, in_features, num_classes, **kwargs)
        with torch.device(device):
            return build(arch, in_features, num_classes, **kwargs)


def _signature(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _suggest(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Guess the architecture and kwargs that would fit a state dict, from its shapes."""
    keys = set(shapes)
    # MLP: "0.weight", "2.weight", ... all 2-D.
    lin = sorted(
        int(k.split(".")[0]) for k in keys
        if k.endswith(".weight") and k.split(".")[0].isdigit()
        and len(shapes[k]) == 2 and k.count(".") == 1
    )
    if lin and lin == list(range(0, 2 * len(lin), 2)) and all(
        k.split(".")[0].isdigit() for k in keys
    ):
        ws = [shapes[f"{i}.weight"] for i in lin]
        kw = {
            "in_features": ws[0][1],
            "num_classes": ws[-1][0],
            "hidden": [w[0] for w in ws[:-1]],
            "bias": f"{lin[0]}.bias" in keys,
        }
        return f"arch='mlp' with {kw} (the activation is not recorded in the weights)"
    if "stem.weight" in keys and "fc.weight" in keys:
        blocks = {k.split(".")[1] for k in keys if k.startswith("blocks.")}
        kw = {
            "num_classes": shapes["fc.weight"][0],
            "channels": shapes["stem.weight"][0],
            "num_blocks": len(blocks),
            "kernel_size": shapes["stem.weight"][-1],
            "norm": "group" if any(".norm" in k for k in keys) else "none",
        }
        return f"arch='resnet1d' with {kw} (any in_features)"
    convs = sorted((k for k in keys if k.startswith("features.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    heads = sorted((k for k in keys if k.startswith("head.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    if convs and heads:
        kw = {
            "num_classes": shapes[heads[-1]][0],
            "channels": [shapes[k][0] for k in convs],
            "kernel_size": shapes[convs[0]][-1],
            "hidden": [shapes[k][0] for k in heads[:-1]],
        }
        flat = shapes[heads[0]][1]
        return (f"arch='cnn1d' with {kw}; the head takes {flat} features "
                "(channels[-1] × final length with pool='flatten'), which fixes "
                "in_features together with stride")
    return "no covariant architecture recognised from the parameter names"


def _mismatch_message(
    arch: str,
    kwargs: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, tuple[int, ...]],
    *,
    limit: int = 8,
) -> str | None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k}: checkpoint {got[k]} vs model {expected[k]}"
             for k in expected if k in got and got[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return None

    def fmt(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = [f"checkpoint does not fit architecture {arch!r} with {dict(kwargs)}:"]
    if missing:
        parts.append(f"missing keys [{fmt(missing)}]")
    if unexpected:
        parts.append(f"unexpected keys [{fmt(unexpected)}]")
    if wrong:
        parts.append(f"shape mismatches [{fmt(wrong)}]")
    parts.append(f"The weights look like: {_suggest(got)}.")
    return " ".join(parts)


def _digest(arch: str, kwargs: Any, metadata: Any, state_dict: Mapping[str, Any]) -> str:
    """SHA-256 of the recipe (as canonical JSON) and of every state tensor (name, dtype,
    shape and bytes), in key order."""
    h = hashlib.sha256()
    recipe = {"arch": arch, "arch_kwargs": kwargs, "metadata": metadata}
    h.update(json.dumps(recipe, sort_keys=True, allow_nan=True).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"\0{key}\0{t.dtype}\0{tuple(state_dict[key].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    **arch_kwargs: Any,
) -> None:
    """Save ``model`` with the recipe to rebuild it, atomically (temp file + ``os.replace``).

    The file holds a dict ``{"format", "arch", "arch_kwargs", "state_dict", "metadata",
    "sha256"}`` of plain data and tensors only, so it loads with
    ``torch.load(..., weights_only=True)``; ``sha256`` covers the recipe and the tensors and is
    checked by :func:`load_checkpoint`.

    Parameters
    ----------
    path : path
        Destination; parent folders are created.
    model : nn.Module
        The model to save.
    arch : str, optional
        Architecture name. Defaults to the model's own (``model.arch_name``) for models built
        by this module, whose ``arch_kwargs`` are then the defaults for ``**arch_kwargs``.
    metadata : mapping, optional
        Extra plain data to store (e.g. training settings).
    **arch_kwargs
        Constructor options, including ``in_features`` and ``num_classes``. Values must be
        None, bool, int, float, str or lists/dicts of those (tuples are stored as lists).

    Raises
    ------
    ArchitectureMismatchError
        If ``arch(**arch_kwargs)`` would not have the model's parameter names and shapes, so
        the checkpoint could not be loaded back.

    Example
    -------
    >>> import tempfile, os
    >>> from covariant.zoo.architectures import preset
    >>> m = preset("mlp-small")
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> save_checkpoint(path, m)
    >>> m2, meta = load_checkpoint(path)
    >>> meta["arch"], bool(torch.equal(m(torch.ones(1, 40)), m2(torch.ones(1, 40))))
    ('mlp', True)
    """
    own_arch = getattr(model, "arch_name", None)
    own_kwargs = getattr(model, "arch_kwargs", None)
    if arch is None:
        if own_arch is None or own_kwargs is None:
            raise ValueError(
                f"cannot tell the architecture of a {type(model).__name__}; pass "
                f"arch=... (one of {sorted(ARCHITECTURES)}) and its kwargs"
            )
        arch = own_arch
    arch = arch.lower()
    kwargs: dict[str, Any] = dict(own_kwargs) if (own_arch == arch and own_kwargs) else {}
    kwargs.update(arch_kwargs)
    kwargs = _check_primitive(kwargs, "arch_kwargs")
    meta = _check_primitive(dict(metadata or {}), "metadata")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    expected = _signature(_build_quietly(arch, kwargs, device="meta").state_dict())
    message = _mismatch_message(arch, kwargs, expected, _signature(state_dict))
    if message is not None:
        raise ArchitectureMismatchError("refusing to save: " + message)

    payload = {
        "format": _FORMAT,
        "arch": arch,
        "arch_kwargs": kwargs,
        "state_dict": state_dict,
        "metadata": meta,
        "sha256": _digest(arch, kwargs, meta, state_dict),
    }
    atomic_save_torch(path, payload)


def _check_container(path: str | os.PathLike[str]) -> None:
    """Raise a clear error for a missing, directory, empty or zip-corrupted file."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"{name!r} is a directory, not a checkpoint file")
    if not os.path.exists(name):
        raise FileNotFoundError(f"checkpoint {name!r} does not exist")
    if os.path.getsize(name) == 0:
        raise CheckpointError(f"{name!r} is empty (0 bytes), not a checkpoint")
    if zipfile.is_zipfile(name):
        try:
            with zipfile.ZipFile(name) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError,
                NotImplementedError) as err:
            raise CheckpointError(f"{name!r} is a corrupted zip archive: {err}") from err
        if bad is not None:
            raise CheckpointError(
                f"{name!r} is corrupted: the CRC-32 of its member {bad!r} does not match "
                "(the file changed after it was written)"
            )


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: str | os.PathLike[str], map_location: str | torch.device) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as a :class:`CheckpointError`
    (a missing file or a directory stays an ``OSError``)."""
    _check_container(path)
    name = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED_GLOBAL.search(str(err))
        if found is None:
            raise CheckpointError(
                f"{name!r} is not a readable PyTorch checkpoint (corrupted, or not written by "
                "torch.save): its pickle cannot be read"
            ) from err
        raise CheckpointError(
            f"{name!r} holds objects that safe loading (torch.load(..., weights_only=True)) "
            f"refuses (it needs {found.group(1)}), such as a whole model saved with "
            "torch.save(model). Save model.state_dict() instead, or use "
            "covariant.zoo.checkpoints.save_checkpoint"
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, UnicodeDecodeError,
            AttributeError, TypeError) as err:
        detail = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"{name!r} is not a readable PyTorch checkpoint (truncated, corrupted, or not "
            f"written by torch.save): {type(err).__name__}: {detail}"
        ) from err


def _verify(path: str | os.PathLike[str], obj: Mapping[str, Any],
            state_dict: Mapping[str, Any]) -> None:
    """Check the stored SHA-256 of a :func:`save_checkpoint` file; warn if it has none."""
    name = os.fspath(path)
    stored = obj.get("sha256")
    if stored is None:
        warnings.warn(
            f"{name!r} has no checksum (saved by an older covariant), so its integrity cannot "
            "be verified; save it again with save_checkpoint to add one",
            UserWarning, stacklevel=4,
        )
        return
    digest = _digest(obj.get("arch"), obj.get("arch_kwargs") or {}, obj.get("metadata") or {},
                     state_dict)
    if digest != stored:
        raise CheckpointError(
            f"{name!r} is corrupted: the SHA-256 of its weights and recipe is {digest[:16]}…, "
            f"but the file records {str(stored)[:16]}… (the file changed after it was written)"
        )


def _read(
    path: str | os.PathLike[str], map_location: str | torch.device
) -> tuple[dict[str, Any], str | None, dict[str, Any], dict[str, Any], str]:
    """Read a checkpoint or (wrapped) state dict: ``(state_dict, arch, arch_kwargs, metadata,
    source)``, prefixes stripped; raise if it holds anything but tensors."""
    obj = _torch_load(path, map_location)
    if not isinstance(obj, Mapping):
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a checkpoint or state dict"
        )
    stored_kwargs: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state_dict = dict(obj["state_dict"])
        stored_arch = obj.get("arch")
        stored_kwargs = dict(obj.get("arch_kwargs") or {})
        metadata = dict(obj.get("metadata") or {})
        source = "checkpoint" if stored_arch is not None else "state_dict"
        if obj.get("format") == _FORMAT and not [
                k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]:
            _verify(path, obj, state_dict)
    else:
        state_dict, stored_arch, source = dict(obj), None, "state_dict"
    state_dict = _strip_prefix(state_dict)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} is not a state dict: entries {bad[:8]} are not tensors"
        )
    return state_dict, stored_arch, stored_kwargs, metadata, source


def _load_weights(model: nn.Module, state_dict: dict[str, Any],
                  map_location: str | torch.device) -> nn.Module:
    """Load ``state_dict`` into ``model`` in its floating dtype; move it; eval mode."""
    float_dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    model.load_state_dict(state_dict, strict=True)
    return model.to(map_location).eval()


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    map_location: str | torch.device = "cpu",
    **arch_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint (``torch.load(..., weights_only=True)`` only).

    Accepts a file written by :func:`save_checkpoint`, or a bare state dict (also one wrapped
    as ``{"state_dict": ...}``) when ``arch`` and at least ``in_features`` / ``num_classes``
    are given. Explicit ``arch`` / ``arch_kwargs`` override what the file records (with another
    ``arch``, only the stored ``in_features`` / ``num_classes`` are kept). The model
    takes the floating dtype of the stored weights, so a float64 model comes back float64.
    ``module.`` / ``_orig_mod.`` prefixes (DataParallel, torch.compile) are removed.

    Parameters
    ----------
    path : path
        Checkpoint file.
    arch : str, optional
        Architecture name; required for a bare state dict.
    map_location : str or torch.device, default "cpu"
        Where to put the tensors.
    **arch_kwargs
        Constructor options that override or complete the stored ones.

    Returns
    -------
    model : nn.Module
        In eval mode.
    meta : dict
        ``{"arch", "arch_kwargs", "metadata", "source"}`` where source is ``"checkpoint"`` or
        ``"state_dict"``.

    Raises
    ------
    ArchitectureMismatchError
        If the weights do not fit: the message lists missing / unexpected keys and shape
        mismatches, and what architecture and kwargs the weights look like.
    CheckpointError
        If the file cannot be read or fails its checks (see the module docstring).

    Example
    -------
    >>> import tempfile, os
    >>> from covariant.zoo.architectures import preset
    >>> path = os.path.join(tempfile.mkdtemp(), "sd.pt")
    >>> torch.save(preset("mlp-small").state_dict(), path)
    >>> model, meta = load_checkpoint(path, arch="mlp", in_features=40, num_classes=10,
    ...                               hidden=[32, 32])
    >>> meta["source"], meta["arch_kwargs"]["hidden"]
    ('state_dict', [32, 32])
    """
    state_dict, stored_arch, stored_kwargs, metadata, source = _read(path, map_location)
    got = _signature(state_dict)
    arch = (arch or stored_arch)
    if arch is None:
        raise ArchitectureMismatchError(
            f"{os.fspath(path)!r} is a bare state dict; pass arch=... and its kwargs. "
            f"The weights look like: {_suggest(got)}."
        )
    arch = arch.lower()
    if stored_arch is not None and arch != stored_arch:
        # another architecture: only the data sizes of the stored recipe carry over
        stored_kwargs = {k: v for k, v in stored_kwargs.items()
                         if k in ("in_features", "num_classes")}
    kwargs = {**stored_kwargs, **arch_kwargs}
    try:
        model = _build_quietly(arch, kwargs)
    except ValueError as err:
        raise ArchitectureMismatchError(
            f"cannot build {arch!r} with {kwargs}: {err}. The weights look like: {_suggest(got)}."
        ) from err
    message = _mismatch_message(arch, kwargs, _signature(model.state_dict()), got)
    if message is not None:
        raise ArchitectureMismatchError(message)
    model = _load_weights(model, state_dict, map_location)
    meta = {"arch": arch, "arch_kwargs": kwargs, "metadata": metadata, "source": source}
    return model, meta
