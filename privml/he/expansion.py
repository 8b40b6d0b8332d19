"""Client-side input expansion for the latency layout: im2col, generalised to any first linear map.

A strided or multi-channel convolution has many distinct extended diagonals (TutorialCNN's
7x7/stride-3 conv: ~1000), so its diagonal product needs many rotations and products. If the
client instead encrypts x' = P x, where P copies each output position's receptive field into
its own slots (x'[k*G + g] = x[cols_g[k]] for receptive field g), the same layer becomes
W' x' with W'[r, k*G + g(r)] = W[r, cols_g(r)[k]], whose diagonals k*G + g(r) - r collapse
to a handful (for a conv: 64 * (k - c_out) when G is the number of output positions). P is
public: it only encodes which inputs each output position reads (the architecture), never
weights. The planner derives it from the first layer's sparsity pattern and keeps it only when
it cuts the number of diagonals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from privml.errors import PrivmlError


@dataclass(frozen=True)
class InputExpansion:
    """x' = x[index] (0 where index < 0), |x'| = K*G; ``row_group[r]`` is output row r's receptive field."""

    index: np.ndarray
    row_group: np.ndarray
    groups: int
    width: int
    pattern: str

    def expand(self, flat: np.ndarray) -> np.ndarray:
        """Expand a batch of flattened inputs (batch, n) -> (batch, K*G)."""
        out = flat[:, np.clip(self.index, 0, None)]
        out[:, self.index < 0] = 0.0
        return out

    def weight(self, w: np.ndarray) -> np.ndarray:
        """W' with W' x' = W x for x' = expand(x); raises if ``w`` does not fit this expansion."""
        if _pattern(w) != self.pattern:
            raise PrivmlError("privml: the first layer's weights do not match the plan's input expansion "
                              "(was the model changed after compiling?)")
        m = w.shape[0]
        out = np.zeros((m, self.width * self.groups))
        rows, cols = np.nonzero(w)
        slot_of = {(int(self.index[k * self.groups + g]), g): k * self.groups + g
                   for g in range(self.groups) for k in range(self.width) if self.index[k * self.groups + g] >= 0}
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            out[r, slot_of[(c, int(self.row_group[r]))]] = w[r, c]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index.tolist(), "row_group": self.row_group.tolist(), "groups": self.groups,
                "width": self.width, "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputExpansion:
        return cls(np.asarray(d["index"], dtype=np.int64), np.asarray(d["row_group"], dtype=np.int64),
                   int(d["groups"]), int(d["width"]), str(d["pattern"]))


def _pattern(w: np.ndarray) -> str:
    nz = np.packbits(w != 0)
    return hashlib.sha256(str(w.shape).encode() + nz.tobytes()).hexdigest()[:32]


def _diagonal_count(rows: np.ndarray, cols: np.ndarray) -> int:
    return int(np.unique(cols - rows).size)


def plan_expansion(w: np.ndarray, slots: int, min_gain: float = 2.0) -> InputExpansion | None:
    """The expansion for first-layer weight ``w`` (m, n), or None when it would not pay off or not fit."""
    m, _ = w.shape
    fields: dict[tuple[int, ...], int] = {}
    row_group = np.empty(m, dtype=np.int64)
    for r in range(m):
        row_group[r] = fields.setdefault(tuple(np.nonzero(w[r])[0].tolist()), len(fields))
    groups = len(fields)
    width = max((len(f) for f in fields), default=0)
    if width == 0 or width * groups + m > slots:
        return None
    index = -np.ones(width * groups, dtype=np.int64)
    for cols, g in fields.items():
        for k, c in enumerate(cols):
            index[k * groups + g] = c
    rows, cols = np.nonzero(w)
    before = _diagonal_count(rows, cols)
    k_of = {}
    for cols_t, g in fields.items():
        for k, c in enumerate(cols_t):
            k_of[(c, g)] = k
    new_cols = np.array([k_of[(int(c), int(row_group[r]))] * groups + row_group[r] for r, c in zip(rows, cols,
                                                                                                    strict=True)])
    after = _diagonal_count(rows, new_cols) if rows.size else 0
    if after * min_gain > before:
        return None
    return InputExpansion(index, row_group, groups, width, _pattern(w))
