"""Argument types of the ``covariant`` command: every numeric flag is checked by argparse.

Each function is an argparse ``type=``: it converts the text of one flag or raises
:class:`argparse.ArgumentTypeError`, which argparse reports as
``covariant <cmd>: error: argument --flag: <message>`` with exit status 2. A bad value is
rejected before anything is computed, instead of silently changing the question (a negative
``--samples`` slicing from the end, a negative ``--damping`` being ignored, a negative
weight-norm scale flipping the weights).

Example
-------
>>> positive_int("3"), at_least_two("2"), nonnegative_float("1e-3")
(3, 2, 0.001)
>>> chart_spec(" WeightNorm:10 ")
'weightnorm:10'
>>> try:
...     nonnegative_float("nan")
... except argparse.ArgumentTypeError as err:
...     print(err)
must be a finite number >= 0, got 'nan'
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .._constants import METRIC_NAMES

__all__ = [
    "CLI_DATASETS",
    "arch_kwargs",
    "at_least_two",
    "chart_spec",
    "dataset_name",
    "metric_name",
    "nonnegative_float",
    "parse_kwargs",
    "positive_int",
    "seed",
]

#: Datasets ``covariant flatness`` accepts (classification, for the cross-entropy loss).
CLI_DATASETS = ("mnist1d", "digits", "synthetic", "synthetic-images")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (``--samples``, ``--k``)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed torch accepts: an integer in [0, 2⁶⁴)."""
    value = _int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


def metric_name(text: str) -> str:
    """One of the metric names of :data:`covariant.metrics.METRIC_NAMES` (case-insensitive;
    the list lives in the torch-free :mod:`covariant._constants`)."""
    key = text.strip().lower().replace("-", "_")
    if key not in METRIC_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown metric {text!r}; choose from {', '.join(METRIC_NAMES)}")
    return key


def at_least_two(text: str) -> int:
    """An integer >= 2 (``--num-probes``: one probe has no standard error)."""
    value = _int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 2 (the standard error needs two probes), got {text!r}")
    return value


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (``--damping``; 0 means no damping)."""
    value = _finite(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _chart_number(arg: str, text: str, what: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def chart_spec(text: str) -> str:
    """``none``, ``weightnorm``, ``weightnorm:S`` with S > 0, or ``scale:A`` with A != 0;
    returned lower-case and stripped."""
    spec = text.strip().lower()
    kind, sep, arg = spec.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind in ("none", "w", "") and not sep:
        return spec or "none"
    if kind == "weightnorm":
        need = "weightnorm:S needs a finite scale S > 0 (S <= 0 would move to other weights)"
        if sep and _chart_number(arg, text, need) <= 0:
            raise argparse.ArgumentTypeError(f"{need}, got {text!r}")
        return spec
    if kind == "scale":
        need = "scale:A needs a finite A != 0, e.g. scale:0.1"
        if _chart_number(arg, text, need) == 0:
            raise argparse.ArgumentTypeError(f"{need}, got {text!r}")
        return spec
    raise argparse.ArgumentTypeError(
        f"unknown chart {text!r}; use none, weightnorm, weightnorm:S (S > 0) or scale:A")


def dataset_name(text: str) -> str:
    """One of :data:`CLI_DATASETS` (``mnist-1d`` / ``MNIST1D`` spell ``mnist1d``)."""
    key = text.strip().lower().replace("_", "-")
    key = "mnist1d" if key == "mnist-1d" else key
    if key not in CLI_DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}; choose from {', '.join(CLI_DATASETS)}")
    return key


def parse_kwargs(text: str) -> dict[str, Any]:
    """``'key=v;key=v1,v2'`` → a dict; values become int, float or str, lists on commas.

    >>> parse_kwargs("hidden=64,64;activation=tanh;scale=0.5")
    {'hidden': [64, 64], 'activation': 'tanh', 'scale': 0.5}
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [v.strip() for v in value.split(",")]
        conv: list[Any] = []
        for v in parts:
            try:
                conv.append(int(v))
            except ValueError:
                try:
                    conv.append(float(v))
                except ValueError:
                    conv.append(v)
        out[key.strip()] = conv if len(conv) > 1 or value.endswith(",") else conv[0]
    return out


def arch_kwargs(text: str) -> str:
    """``--arch-kwargs``: checked with :func:`parse_kwargs`, returned unchanged."""
    try:
        parse_kwargs(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
