"""Which rows of a forward belong to the weak model, as the handlers (``handlers.py``) see them.

The runtime tells a ``RowState``, through ``weak_call``, which rows of the current forward
are weak: none, all of them (a weak evaluation in a forward of its own), or chunks of the
model's batch (the weak null evaluation batched with the fine-tuned ones, as CFG batches cond
and uncond). A layer that sees another number of rows than the model's batch cannot be
guided row by row: ``RowLayoutChanged``, and the runtime moves the weak evaluation to a
forward of its own (``routing.py``), never guesses.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ...guidance import GuidanceInputError

if TYPE_CHECKING:
    from .handlers import Handler

ALL = "all rows"  # every row of the current call is weak
Rows = None | str | list[slice]


class RowLayoutChanged(Exception):
    """A layer saw another number of rows than the model's batch: its rows cannot be told apart by position."""

    def __init__(self, handler: Handler, rows_seen: int, batch: int):
        super().__init__(f"{handler.path} ({type(handler.module).__name__}) saw {rows_seen} rows in a forward of {batch}")
        self.path = handler.path


class RowState:
    """Which rows of the current forward are weak, with what coefficient (omega - 1), and what ran."""

    def __init__(self):
        self.rows: Rows = None
        self.batch = 0
        self.coefficient: float | torch.Tensor = 0.0  # one value, or one per latent row (PG Sweep)
        self.ran: set[int] = set()

    @contextmanager
    def weak_call(self, rows: Rows, batch: int):
        """For the length of one call of ``batch`` rows: ``rows`` of them are weak (the runtime's forward, or a
        row-mixing module's call of its own)."""
        saved = self.rows, self.batch
        self.rows, self.batch = rows, batch
        try:
            yield
        finally:
            self.rows, self.batch = saved

    def mark_ran(self, handler: Handler) -> None:
        """``handler`` gave its module's weak rows their weights in this forward."""
        self.ran.add(id(handler))

    @property
    def inactive(self) -> bool:
        """No weak rows, or omega = 1 for all of them: the weak model is the fine-tuned one."""
        return self.rows is None or (not isinstance(self.coefficient, torch.Tensor) and self.coefficient == 0.0)

    def weak_rows(self, handler: Handler, rows_seen: int) -> Rows:
        """The weak rows of a call of ``handler``'s module that sees ``rows_seen`` rows."""
        if self.rows is None:
            return None
        self.mark_ran(handler)
        if self.rows is ALL:
            return ALL
        if rows_seen != self.batch:
            raise RowLayoutChanged(handler, rows_seen, self.batch)
        return self.rows

    def coefficient_for(self, rows: int):
        """The coefficient for ``rows`` consecutive weak rows (per-row values repeat for every weak chunk)."""
        c = self.coefficient
        if isinstance(c, torch.Tensor) and c.shape[0] != rows:
            if rows % c.shape[0]:
                raise GuidanceInputError("Personalization guidance: per-row omega values do not match the batch.")
            c = c.repeat(rows // c.shape[0])
        return c


def chunks(rows: Rows, size: int) -> list[slice]:
    return [slice(0, size)] if rows is ALL else rows


def segments(weak: list[slice], size: int) -> list[tuple[slice, bool]]:
    """``range(size)`` cut into consecutive chunks, each marked weak or not."""
    out, at = [], 0
    for chunk in sorted(weak, key=lambda c: c.start):
        if chunk.start > at:
            out.append((slice(at, chunk.start), False))
        out.append((chunk, True))
        at = chunk.stop
    if at < size:
        out.append((slice(at, size), False))
    return out

