"""Progress bars: tqdm when it is installed and asked for, a silent no-op otherwise.

Library calls default to ``progress=False``; the command line turns bars on. tqdm is an
optional extra (``pip install 'covariant[progress]'``), so a missing tqdm never breaks a
computation: the bar is simply not shown.

Example
-------
>>> bar = progress_bar(range(3), enabled=False, desc="steps")
>>> list(bar)
[0, 1, 2]

Work deep inside a computation (the build of a dense metric, inside a solve, inside an
estimator) has no ``progress`` argument of its own; it asks :func:`progress_enabled`, which
is True inside ``with progress_scope(True):``.

>>> with progress_scope(True):
...     progress_enabled()
True
>>> progress_enabled()
False
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("covariant_progress",
                                                                default=False)


class _NoBar:
    def __init__(self, iterable: Iterable[Any] | None = None, **_: Any) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    enabled: bool = False,
    total: int | None = None,
    desc: str | None = None,
) -> Any:
    """Wrap ``iterable`` (or count to ``total``) in a tqdm bar when ``enabled``.

    Example
    -------
    >>> sum(progress_bar(range(3), enabled=False))
    3
    """
    if not enabled:
        return _NoBar(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def progress_scope(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`progress_enabled` returns ``enabled`` (nested work shows its
    own bars: a dense metric's build inside an estimator's solves)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def progress_enabled() -> bool:
    """Whether the innermost :func:`progress_scope` asked for progress bars (default False)."""
    return _ENABLED.get()
