"""One column of a parted transition store, presented as one array.

A parted arrow store (spec ``store.part_rows``) holds its transitions in several part files,
each one record batch, so a column is not one contiguous buffer but one memory-mapped,
zero-copy NumPy view per part. :class:`PartedColumn` holds those views and where each
part starts, and answers what the readers of a store ask of a column::

    col = store.observations        # PartedColumn, shape (N, obs_dim), float32
    col[rows]                       # (len(rows), obs_dim) ndarray: a gather (below)
    col[10:20]                      # a view when the rows are in one part, else a copy
    col[7]                          # one row
    np.asarray(col)                 # the whole column in one array (a copy)

Gathering ``col[rows]`` (what the trainer's samplers and the d3rlpy adapter do) is
vectorised: the rows in increasing order (as they come when they are the rows of some
episodes; else one ``np.argsort``), ONE ``np.searchsorted`` of the part starts among them
(so each part's rows are one run), then ONE ``np.take`` per part that holds some of them,
straight into the output, or into a buffer put back in the order asked for with one
scatter. No Python loop runs per row; one runs per part.

Cost (scripts/bench_parts.py): gathering the training rows of a whole store, what the
trainer does once per run, costs about what one array's gather does; a random batch of 256
rows costs a few NumPy calls per part on top of one fancy index, so a sampler that draws
small batches straight from a store of many parts pays several times an array's cost
(the trainer's samplers draw from the packed matrix instead).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


class PartedColumn:
    """A column made of per-part arrays laid end to end: part ``k`` holds the rows
    ``starts[k]:starts[k + 1]``. Read-only: the parts are views of the store's files."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("a parted column needs at least one part")
        first = parts[0]
        for k, p in enumerate(parts):
            if p.ndim == 0 or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"part {k}: {p.dtype} {p.shape}, part 0 is {first.dtype} {first.shape}; "
                    "every part must hold rows of the same dtype and shape"
                )
        self.parts: tuple[np.ndarray, ...] = tuple(parts)
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        # (P + 1,) int64: the first row of each part, then the number of rows
        self.starts: np.ndarray = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._starts: list[int] = self.starts.tolist()
        self.dtype: np.dtype = first.dtype
        self.shape: tuple[int, ...] = (int(self.starts[-1]), *first.shape[1:])

    # ------------------------------------------------------------------ array-like
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"PartedColumn(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        """The whole column as one array: a copy (the parts are separate buffers), unless
        there is one part and no copy is asked for."""
        if len(self.parts) == 1 and not copy:
            return np.asarray(self.parts[0], dtype=dtype)
        if copy is False:
            raise ValueError(
                f"a column of {len(self.parts)} parts is not one buffer: it cannot be one "
                "array without a copy"
            )
        return np.concatenate(self.parts, dtype=dtype, casting="unsafe")

    def astype(self, dtype: npt.DTypeLike) -> np.ndarray:
        """The whole column in ``dtype``, as one new array."""
        return np.concatenate(self.parts, dtype=dtype, casting="unsafe")

    def copy(self) -> np.ndarray:
        return np.concatenate(self.parts)

    def tolist(self) -> list[Any]:
        return [x for p in self.parts for x in p.tolist()]

    def __iter__(self) -> Iterator[Any]:
        for p in self.parts:
            yield from p

    def max(self) -> Any:
        return np.max([p.max() for p in self.parts if len(p)])

    def min(self) -> Any:
        return np.min([p.min() for p in self.parts if len(p)])

    # ------------------------------------------------------------------ indexing
    def part_of(self, rows: np.ndarray) -> np.ndarray:
        """(M,) int64: the part that holds each of ``rows`` (non-negative, in range)."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def __getitem__(self, key: Any) -> Any:
        """``col[rows]`` or ``col[rows, i, ...]``: rows (an integer, a slice, an integer or
        boolean array), then integers or slices within a row, as NumPy reads them."""
        if isinstance(key, tuple):
            if not key:
                return np.asarray(self)
            first, rest = key[0], key[1:]
            if not all(isinstance(k, slice) or np.ndim(k) == 0 for k in rest):
                raise IndexError("a parted column takes rows, then integers or slices")
            if isinstance(first, slice):
                lead = 1
            else:
                rows = np.asarray(first)
                lead = 1 if rows.dtype == np.bool_ else rows.ndim  # the axes the rows make
            return self[first][(slice(None),) * lead + rest]
        if isinstance(key, slice):
            return self._slice(*key.indices(len(self)))
        if key is None or key is Ellipsis:
            raise IndexError("a parted column takes rows: an integer, a slice or an array")
        if np.ndim(key) == 0 and not isinstance(key, np.ndarray | list):
            return self._row(operator.index(key))
        index = np.asarray(key)
        if index.dtype == np.bool_:
            if index.shape != (len(self),):
                raise IndexError(
                    f"boolean index of shape {index.shape} for a column of {len(self)} rows"
                )
            return self.take(np.flatnonzero(index))
        return self.take(index)

    def _row(self, i: int) -> Any:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for axis 0 with size {n}")
        i %= n
        k = int(self.part_of(np.asarray(i)))
        return self.parts[k][i - int(self.starts[k])]

    def _slice(self, start: int, stop: int, step: int) -> np.ndarray:
        if step != 1:
            return self.take(np.arange(start, stop, step, dtype=np.int64))
        if stop <= start:
            return self.parts[0][0:0]
        k0, k1 = (int(k) for k in self.part_of(np.array([start, stop - 1])))
        s = self.starts
        if k0 == k1:  # within one part: a view of it
            return self.parts[k0][start - s[k0] : stop - s[k0]]
        pieces = [self.parts[k0][start - s[k0] :], *self.parts[k0 + 1 : k1]]
        return np.concatenate([*pieces, self.parts[k1][: stop - s[k1]]])

    def take(self, index: npt.ArrayLike) -> np.ndarray:
        """The rows ``index`` (any shape of integers, negatives from the end) as a new
        array of shape ``index.shape + row shape``: the vectorised gather (module doc)."""
        idx = np.asarray(index)
        if idx.dtype.kind not in "iu":
            if idx.size:
                raise IndexError("arrays used as indices must be of integer (or boolean) type")
            idx = idx.astype(np.int64)
        rows = idx.reshape(-1).astype(np.int64, copy=False)
        out = np.empty((rows.size, *self.shape[1:]), dtype=self.dtype)
        if rows.size == 0:
            return out.reshape(idx.shape + self.shape[1:])
        order = None  # rows already in order: each part's rows are one run of the output
        if rows.size > 1 and not (rows[1:] >= rows[:-1]).all():
            order = np.argsort(rows)  # equal rows hold equal values: any sort will do
            rows = rows[order]
        lo, hi, n = int(rows[0]), int(rows[-1]), len(self)
        if lo < -n or hi >= n:
            raise IndexError(
                f"index {lo if lo < -n else hi} is out of bounds for axis 0 with size {n}"
            )
        if lo < 0:  # rare: count negative rows from the end, then gather as usual
            rows = idx.reshape(-1).astype(np.int64, copy=False)
            return self.take(np.where(rows < 0, rows + n, rows).reshape(idx.shape))
        # ONE search: where each part's rows begin among the sorted rows
        cuts = np.searchsorted(rows, self.starts).tolist()
        into = out if order is None else np.empty_like(out)
        for k, part in enumerate(self.parts):
            a, b = cuts[k], cuts[k + 1]
            if a < b:  # rows checked above: "clip" never clips, and spares a buffer
                np.take(part, rows[a:b] - self._starts[k], axis=0, out=into[a:b], mode="clip")
        if order is not None:
            out[order] = into  # one scatter back to the order asked for
        return out.reshape(idx.shape + self.shape[1:])


# A column of a transition store: one array, or the parts of a parted store.
Column = np.ndarray | PartedColumn
