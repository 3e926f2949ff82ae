r"""The batches a model metric of :class:`~covariant.optim.RiemannianGD` is taken on.

``data`` is one ``(X, y)`` pair, used at every step, or an iterable of such batches that each
step draws the next one from; a re-iterable (a list, a ``DataLoader``) starts over when it is
exhausted. The number of draws is recorded, so that a resumed optimizer continues with the
batch it would have drawn next.

Example
-------
>>> import torch
>>> batches = [(torch.zeros(2, 1), torch.zeros(2)), (torch.ones(3, 1), torch.ones(3))]
>>> stream = _BatchStream(batches)
>>> [stream.next()[0].shape[0] for _ in range(3)]             # cycles through the list
[2, 3, 2]
>>> stream.drawn
3
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

__all__: list[str] = []


def _is_batch(data: Any) -> bool:
    """True for one ``(X, y)`` pair of tensors."""
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    )


def _check_data(data: Any) -> None:
    """Raise ValueError unless ``data`` is an ``(X, y)`` pair or an iterable of batches."""
    if _is_batch(data):
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise ValueError(
            "RiemannianGD: data must be an (X, y) pair of tensors or an iterable of such "
            f"batches, got {type(data).__name__}"
        )


class _BatchStream:
    """Draws batches from ``data`` and counts the draws (``drawn``)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.drawn = 0
        self._iter: Iterator[Any] | None = None

    def next(self) -> tuple[Tensor, Tensor]:
        """The batch of this step: the fixed pair, or the next one of the iterable."""
        data = self.data
        if _is_batch(data):
            self.drawn += 1
            return data[0], data[1]
        if self._iter is None:
            self._iter = iter(data)
        for attempt in range(2):
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                fresh = iter(data)
                if attempt == 1 or fresh is data or fresh is self._iter:
                    raise ValueError(
                        "RiemannianGD: the data iterator is exhausted (or empty). Pass a "
                        "re-iterable (a list of batches, a DataLoader) to cycle through it."
                    ) from None
                self._iter = fresh
        self.drawn += 1
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise ValueError("RiemannianGD: each batch in data must be an (X, y) pair")
        return batch[0], batch[1]

    def skip(self, n: int) -> None:
        """Start over and position a fresh iterator after ``n`` draws (for a resumed run)."""
        self.drawn = 0
        self._iter = None
        if _is_batch(self.data) or self.data is None:
            self.drawn = n
            return
        for _ in range(n):
            self.next()
