"""Where the values of an encrypted tensor live in its ciphertexts.

A :class:`Packing` maps each logical value (row-major flat index of one sample in the latency layout,
one feature in the throughput layout) to a *unit*: a run of ``width`` consecutive slots (width 1 in the
latency layout; the batch in the throughput layout, so a ciphertext carries ``slots // batch`` features of
every sample side by side: partial batches no longer waste slots). Global unit ``u`` lives in ciphertext
``u // per_ct``. A sample (latency) or batch (throughput) spans ``n_cts`` ciphertexts.

Three kinds, each described by a few integers (so they serialize and compare by value):

* ``dense``: value i in unit i.
* ``grid``: a (C, H, W) feature map on a physical (grid_h, grid_w) grid with gap ``g`` (multiplexed
  packing, Lee et al., ICML 2022): channel c goes to plane ``c // g^2`` at offset (ry, rx) =
  divmod(c % g^2, g) and value (c, y, x) to slot ``plane*grid_h*grid_w + (y*g + ry)*grid_w + x*g + rx``.
  A stride-s convolution or pooling maps a gap-g grid to a gap-(g*s) grid on the same physical grid,
  so its output needs no compaction and its extended diagonals stay few (a convolution's diagonal
  offsets do not depend on the output position), and the channels fill the gaps: no slot is wasted.
* ``phase``: a (C, H, W) map whose H x W plane does not fit the units of one ciphertext (throughput
  layout with lanes: a ciphertext holds only ``slots // lanes`` features). The map is cut into f x f
  polyphase components: value (c, y, x) goes to plane ``(c*f + y % f)*f + x % f`` at coarse position
  (y // f, x // f); planes take ``plane`` units (a power of two, so none straddles a ciphertext). A
  convolution then reads each plane from a few other planes at a few fixed offsets, and a 2x2 pooling
  after it adds whole ciphertexts (planes with equal coarse positions), which the block product turns
  into ciphertext additions (:class:`privml.he.kernels.BlockMatVec` merges inputs with equal diagonals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from privml.errors import InvalidInput


@dataclass(frozen=True)
class Packing:
    """Logical value -> unit map of one tensor (see the module docstring)."""

    kind: str  # "dense" | "grid" | "phase"
    n: int  # logical values per sample (latency) / features (throughput)
    width: int  # slots per unit
    per_ct: int  # units per ciphertext
    grid: tuple[int, ...] = ()  # (C, H, W, gap, grid_h, grid_w) for "grid", (C, H, W, f, plane) for "phase"

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "grid", "phase") or self.n < 1 or self.width < 1 or self.per_ct < 1:
            raise InvalidInput(f"privml: invalid packing {self}")
        sizes = {"dense": 0, "grid": 6, "phase": 5}[self.kind]
        if len(self.grid) != sizes:
            raise InvalidInput(f"privml: a {self.kind} packing takes {sizes} integers, got {list(self.grid)}")
        if self.kind == "grid":
            c, h, w, g, gh, gw = self.grid
            if c * h * w != self.n or g < 1 or h * g > gh or w * g > gw:
                raise InvalidInput(f"privml: invalid grid packing {self.grid} for {self.n} values")
        if self.kind == "phase":
            c, h, w, f, plane = self.grid
            if (c * h * w != self.n or f < 1 or h % f or w % f or plane < (h // f) * (w // f)
                    or plane > self.per_ct or self.per_ct % plane):
                raise InvalidInput(f"privml: invalid phase packing {self.grid} for {self.n} values")

    @cached_property
    def units(self) -> np.ndarray:
        """Unit index of every logical value (int64, length n)."""
        if self.kind == "dense":
            return np.arange(self.n, dtype=np.int64)
        if self.kind == "phase":
            c, h, w, f, plane = self.grid
            ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
            u = ((ch * f + y % f) * f + x % f) * plane + (y // f) * (w // f) + x // f
            return u.reshape(-1).astype(np.int64)
        c, h, w, g, gh, gw = self.grid
        ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
        ry, rx = np.divmod(ch % (g * g), g)
        u = (ch // (g * g)) * gh * gw + (y * g + ry) * gw + x * g + rx
        return u.reshape(-1).astype(np.int64)

    @property
    def n_units(self) -> int:
        return int(self.units.max()) + 1

    @property
    def n_cts(self) -> int:
        """Ciphertexts per sample (latency) or per batch (throughput)."""
        return math.ceil(self.n_units / self.per_ct)

    @property
    def fill(self) -> float:
        """Share of the ciphertexts' slots that carry values."""
        return self.n * self.width / (self.n_cts * self.per_ct * self.width)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "width": self.width, "per_ct": self.per_ct, "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> Packing:
        try:
            return cls(str(d["kind"]), int(d["n"]), int(d["width"]), int(d["per_ct"]),
                       tuple(int(v) for v in d.get("grid", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"privml: malformed packing description ({exc})") from None

    # ---- values <-> slot vectors
    def scatter(self, values: np.ndarray, slots: int) -> list[np.ndarray]:
        """Slot vectors (one per ciphertext) holding ``values``: (n,) latency or (n, width) throughput."""
        out = np.zeros((self.n_cts, slots))
        ct, local = np.divmod(self.units, self.per_ct)
        v = np.asarray(values, dtype=np.float64).reshape(self.n, -1)
        if v.shape[1] != self.width:
            raise InvalidInput(f"privml: {v.shape[1]} values per unit for a packing of width {self.width}")
        lanes = np.arange(self.width)
        out[ct[:, None], local[:, None] * self.width + lanes[None, :]] = v
        return list(out)

    def gather(self, vectors: list[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`scatter`: (n,) for width 1, else (n, width)."""
        ct, local = np.divmod(self.units, self.per_ct)
        lanes = np.arange(self.width)
        arr = np.stack([np.asarray(v)[: self.per_ct * self.width] for v in vectors])
        out = arr[ct[:, None], local[:, None] * self.width + lanes[None, :]]
        return out[:, 0] if self.width == 1 else out


def dense(n: int, slots: int, width: int = 1) -> Packing:
    """Values side by side; ``width`` = batch size in the throughput layout."""
    if width > slots:
        raise InvalidInput(f"privml: a batch of {width} exceeds the {slots} slots of a ciphertext: split it")
    return Packing("dense", int(n), int(width), slots // width)


def phase(shape: tuple[int, ...], slots: int, width: int) -> Packing | None:
    """The polyphase packing of a (C, H, W) map whose plane exceeds a ciphertext's ``slots // width`` units:
    the smallest f dividing H and W whose (H/f) x (W/f) planes fit, each rounded up to a power of two;
    None where the plane fits (a grid packs it better) or no such f exists."""
    if len(shape) != 3 or width == 1 or width > slots or slots // width == 1:
        return None  # latency layouts keep the multiplexed grid; one unit per ciphertext needs no packing
    c, h, w = (int(s) for s in shape)
    per_ct = slots // width
    if h * w <= per_ct:
        return None
    for f in range(2, min(h, w) + 1):
        plane = 1 << ((h // f) * (w // f) - 1).bit_length()
        if h % f == 0 and w % f == 0 and plane <= per_ct and per_ct % plane == 0:
            return Packing("phase", c * h * w, width, per_ct, (c, h, w, f, plane))
    return None


def for_shape(shape: tuple[int, ...], slots: int, width: int = 1) -> Packing:
    """The packing of a freshly encrypted sample: dense, remembered as a gap-1 grid for (C, H, W) maps
    (polyphase where, with lanes, a map's plane does not fit one ciphertext)."""
    n = int(np.prod(shape)) if shape else 1
    if len(shape) == 3 and (width == 1 or 1 < slots // width):  # one feature per ciphertext: no layout to choose
        c, h, w = (int(s) for s in shape)
        return phase(shape, slots, width) or Packing("grid", n, width, slots // width, (c, h, w, 1, h, w))
    return dense(n, slots, width)


def output_packing(src: Packing, out_shape: tuple[int, ...], slots: int) -> Packing:
    """Where a linear map from ``src`` puts its output: a (C, H, W) output whose spatial size divides the
    source grid keeps the grid with a larger gap (strided conv, pooling: multiplexed packing), anything else
    is dense (a gap-1 grid for feature maps)."""
    n = int(np.prod(out_shape)) if out_shape else 1
    if src.width != 1 and src.per_ct == 1:
        return dense(n, slots, src.width)
    ph = phase(tuple(out_shape), slots, src.width)
    if ph is not None:
        return ph
    if src.kind == "grid" and len(out_shape) == 3:
        c, h, w = (int(s) for s in out_shape)
        _, _, _, g, gh, gw = src.grid
        if h and w and gh % h == 0 and gw % w == 0 and gh // h == gw // w and (gh // h) % g == 0:
            gap = gh // h
            # only worth it while the channels fill the gaps' offsets; otherwise pack densely
            if c >= gap * gap or gap == g:
                return Packing("grid", n, src.width, src.per_ct, (c, h, w, gap, gh, gw))
    return for_shape(tuple(out_shape), slots, src.width)
