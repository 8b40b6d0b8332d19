"""CKKS building blocks: block diagonal matrix-vector products, polynomial evaluation, throughput dense layer.

* :class:`BlockMatVec`: a sparse linear map between ciphertexts of ``width``-slot units (any packing of
  :mod:`privml.he.packing`: a sample over several ciphertexts, or several throughput features per
  ciphertext), by block baby-step giant-step rotations.
* :func:`dense_throughput`: one ciphertext per feature, one sample per slot; plaintext-scalar products and
  additions, no rotations.

Every kernel consumes exactly the levels it documents and returns ciphertexts at the
canonical scale of their level (see :mod:`privml.he.chain`).  Kernels use only the public
interface of :class:`~privml.he.context.CKKSContext` (its guards and op counters apply).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from privml.approx.basis import poly_depth
from privml.errors import DepthExhausted, InvalidInput
from privml.he.context import CKKSContext, seal

__all__ = [
    "BlockMatVec",
    "cheapest_matvec",
    "dense_throughput",
    "eval_poly",
    "poly_depth",
    "poly_mult_count",
    "poly_value_bound",
]

_KEYS = itertools.count()


def _finite_matrix(weight: Any, name: str = "weight") -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise InvalidInput(f"{name} must be a non-empty 2-D matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise InvalidInput(f"{name} contains NaN or inf")
    return w


def _bias_vector(bias: Any, m: int) -> np.ndarray | None:
    if bias is None:
        return None
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if b.shape != (m,):
        raise InvalidInput(f"bias must have {m} entries, got shape {np.shape(bias)}")
    if not np.all(np.isfinite(b)):
        raise InvalidInput("bias contains NaN or inf")
    return b


# ------------------------------------------------------------------------------------------------
# Linear maps spanning several ciphertexts


def _index_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidInput(f"{name} must be a 1-D integer array, got shape {arr.shape} and dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _positive_int(v: Any, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise InvalidInput(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _giant_costs(e_out: list[np.ndarray], ks: np.ndarray, key_mode: str) -> np.ndarray:
    """Giant-step rotations of every output block for every baby size in ``ks`` (exact, vectorised)."""
    cost = np.zeros(ks.size, dtype=np.int64)
    for e in e_out:
        lo, hi = int(e[0]), int(e[-1])
        if key_mode == "few":  # Horner: steps +k up to the highest giant, -k down to the lowest
            cost += np.maximum(hi // ks, 0) - np.minimum(lo // ks, 0)
            continue
        # direct: one rotation per non-empty block [j k, (j+1) k) with j != 0 (prefix counts over [lo, hi])
        below = np.zeros(hi - lo + 2, dtype=np.int64)
        below[e - lo + 1] = 1
        below = np.cumsum(below)  # below[t] = #diagonals < lo + t
        jlo = lo // ks
        cnt = hi // ks - jlo + 1
        kk = np.repeat(ks, cnt)
        jj = np.repeat(jlo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))
        start = np.clip(jj * kk - lo, 0, hi - lo + 1)
        full = (below[np.minimum(start + kk, hi - lo + 1)] > below[start]) & (jj != 0)
        cost += np.bincount(np.repeat(np.arange(ks.size), cnt), weights=full, minlength=ks.size).astype(np.int64)
    return cost


def _baby_lower_bound(e: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Lower bound on #{e mod k} - 1 for every k in ``ks`` (e: sorted distinct integers).

    Two bounds: a residue class holds at most span // k + 1 values; and with P(k) the pairs of
    values whose difference k divides (an autocorrelation, by FFT), Cauchy-Schwarz on the class
    sizes gives #classes >= n**2 / (n + 2 P(k)).
    """
    n, lo, length = e.size, int(e[0]), int(e[-1] - e[0]) + 1
    spread = -(-n // ((length - 1) // ks + 1))
    ind = np.zeros(length)
    ind[e - lo] = 1.0
    nfft = 1 << (2 * length - 1).bit_length()
    f = np.fft.rfft(ind, nfft)
    diffs = np.rint(np.fft.irfft(f * np.conj(f), nfft)[:length])  # diffs[m] = #pairs at distance m
    cnt = (length - 1) // ks
    kk = np.repeat(ks, cnt)
    mult = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + 1
    pairs = np.bincount(np.repeat(np.arange(ks.size), cnt), weights=diffs[kk * mult], minlength=ks.size)
    classes = np.ceil(n * n / (n + 2.0 * pairs) - 1e-9).astype(np.int64)
    return np.maximum(np.maximum(spread, classes) - 1, 0)


def _block_split(e_in: list[np.ndarray], e_out: list[np.ndarray], kmax: int, key_mode: str) -> int:
    """Baby size k in 1..kmax minimising the rotations of a block BSGS plan (diagonals in units).

    ``e_in[a]`` / ``e_out[c]``: sorted distinct diagonals touching each used input / output
    ciphertext.  "direct" costs sum_a #{e mod k != 0} + sum_c #{floor(e/k) != 0}; "few" costs
    sum_a max(e mod k) + sum_c (max floor(e/k), 0 or more) - (min floor(e/k), 0 or less).  Giant
    costs are exact for every k at once; baby costs are bounded from below for every k, then
    evaluated exactly, in growing chunks in order of the bound, until the bound reaches the best
    cost (branch and bound): every k is covered, ties go to the smaller bound.
    """
    ks = np.arange(1, kmax + 1, dtype=np.int64)
    lower = _giant_costs(e_out, ks, key_mode)
    giants = lower.copy()
    lens = [e.size for e in e_in]
    ea = np.concatenate(e_in)
    aid = np.repeat(np.arange(len(e_in)), lens)
    starts = np.cumsum(lens) - lens
    for e in e_in:
        if key_mode == "direct":
            lower += _baby_lower_bound(e, ks)
        else:  # the largest residue is at least that of any sampled diagonal
            sample = e[np.unique(np.linspace(0, e.size - 1, min(e.size, 8)).astype(np.int64))]
            lower += (sample[:, None] % ks[None, :]).max(axis=0)
    order = np.argsort(lower, kind="stable")
    best, best_k, pos, chunk = 1 << 62, 1, 0, 8
    while pos < order.size:
        idx = order[pos : pos + chunk]
        pos, chunk = pos + chunk, min(2 * chunk, max(8, (1 << 22) // max(ea.size, len(e_in) * kmax)))
        idx = idx[lower[idx] < best]
        if idx.size == 0:
            break
        kc = ks[idx]
        r = ea[:, None] % kc[None, :]
        if key_mode == "direct":  # mark (input ct, residue) pairs per candidate; residue 0 needs no rotation
            width = len(e_in) * int(kc.max())
            cols = np.arange(kc.size)
            mark = np.zeros((kc.size, width), dtype=bool)
            mark[cols[None, :], aid[:, None] * kc[None, :] + r] = True
            mark[cols[:, None], np.arange(len(e_in))[None, :] * kc[:, None]] = False
            babies = mark.sum(axis=1)
        else:
            babies = np.maximum.reduceat(r, starts, axis=0).sum(axis=0)
        cost = babies + giants[idx]
        j = int(np.argmin(cost))
        if cost[j] < best:
            best, best_k = int(cost[j]), int(kc[j])
    return best_k


def _sum_parts(ctx: CKKSContext, parts: Sequence[Any]) -> Any:
    acc = None
    for part in parts:
        if part is None:
            continue
        if acc is None:
            acc = part
        else:
            ctx.add_inplace(acc, part)
    return acc


def _horner_sum(ctx: CKKSContext, inner: dict, gs: range, step: int) -> Any:
    """sum_{g in gs} rot(inner[g], g*k) for gs running away from 0, with rotations by ``step`` only."""
    acc = None
    for g in reversed(gs):
        if acc is not None:
            acc = ctx.rotate(acc, step)
        part = inner.get(g)
        if part is not None:
            if acc is None:
                acc = part
            else:
                ctx.add_inplace(acc, part)
    return None if acc is None else ctx.rotate(acc, step)


class BlockMatVec:
    """y = W x + b for a sparse W between vectors spread over several ciphertexts, in units of ``width`` slots.

    A unit is ``width`` consecutive slots; a ciphertext holds ``per_ct = slots // width`` units
    (trailing slots unused) and global unit u sits in ciphertext u // per_ct at slots
    [(u % per_ct) * width, +width).  Entry (o, i, v) adds v * in[unit i, lane t] to
    out[unit o, lane t] for every lane t < width (width = B applies W to B samples side by
    side); duplicated (o, i) entries are summed, ``bias`` has one value per output unit.

    Each (output ct c, input ct a) block is a sum of cyclic diagonals d (in (-slots/2, slots/2])
    with d = g*k*unit + b*unit: y_c = sum_g rot(sum_{a,b} rot(diag, -g k unit) * rot(x_a, b unit), g k unit).
    Baby rotations are computed once per input ciphertext and shared by every output block,
    giant rotations once per (output ct, g) and shared by every input block; all products of an
    output accumulate at one scale before its single rescale, so the map consumes exactly one level
    and returns canonical ciphertexts.  Input slots outside every entry are ignored (the diagonals
    are zero there) and output slots outside every output unit hold 0 (+ bias).

    ``key_mode``: "direct" (default) uses one Galois key per distinct non-zero baby and giant step
    and picks k minimising the rotations; "few" needs only {unit, k unit, -k unit} (babies by
    repeated rotation, giants Horner-style).  Diagonals are kept as index/value arrays and encoded
    lazily (cached per level by the context): memory grows with the entries, never with slots**2.

    A keyless planner can cost the map from :meth:`rotation_steps` (Galois keys),
    ``rotation_count`` (= ``baby_count`` + ``giant_count``), ``mult_count`` (= ``diagonal_count``)
    and ``plaintext_count`` (diagonals + non-zero bias blocks), all per :meth:`apply`.
    """

    def __init__(
        self,
        out_idx: np.ndarray,
        in_idx: np.ndarray,
        values: np.ndarray,
        n_in_cts: int,
        n_out_cts: int,
        slots: int,
        width: int = 1,
        bias: np.ndarray | None = None,
        key_mode: str = "direct",
        fold: int = 0,
        rescale_first: bool = False,
    ) -> None:
        if key_mode not in ("few", "direct"):
            raise InvalidInput(f"key_mode must be 'few' or 'direct', got {key_mode!r}")
        self.slots = _positive_int(slots, "slots", 2)
        self.width = _positive_int(width, "width")
        if self.width > self.slots:
            raise InvalidInput(f"width {self.width} exceeds the {self.slots} slots of a ciphertext")
        self.n_in_cts = _positive_int(n_in_cts, "n_in_cts")
        self.n_out_cts = _positive_int(n_out_cts, "n_out_cts")
        self.key_mode = key_mode
        self.per_ct = self.slots // self.width
        n_in_units, n_out_units = self.n_in_cts * self.per_ct, self.n_out_cts * self.per_ct
        o, i = _index_array(out_idx, "out_idx"), _index_array(in_idx, "in_idx")
        try:
            v = np.asarray(values, dtype=np.float64).reshape(-1) if np.size(values) else np.zeros(0)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"values must be real numbers: {exc}") from exc
        if np.ndim(values) > 1 or not (o.shape == i.shape == v.shape):
            raise InvalidInput(
                f"out_idx, in_idx and values must be 1-D of one length, got shapes {np.shape(out_idx)}, "
                f"{np.shape(in_idx)} and {np.shape(values)}"
            )
        if not np.all(np.isfinite(v)):
            raise InvalidInput("values contain NaN or inf")
        if o.size and (o.min() < 0 or o.max() >= n_out_units):
            raise InvalidInput(
                f"out_idx must be in [0, {n_out_units}) ({self.n_out_cts} ciphertexts x {self.per_ct} units)"
            )
        if i.size and (i.min() < 0 or i.max() >= n_in_units):
            raise InvalidInput(
                f"in_idx must be in [0, {n_in_units}) ({self.n_in_cts} ciphertexts x {self.per_ct} units)"
            )
        self.bias = None if bias is None else _bias_vector(bias, n_out_units)
        self._key = ("BlockMatVec", next(_KEYS))
        self.fold_steps: list[int] = []  # rotate-and-add steps summing the output's copies (see _fold)
        self.fold_gain = 0.0  # |a value left outside the output units| <= fold_gain * max |input value|
        # rescale each giant step's sum before its rotation: giant key switches one prime cheaper, one rescale
        # per giant step; the rotation's noise is then not divided by the dropped prime (plans with spare scale)
        self.rescale_first = bool(rescale_first)
        if fold:
            o, self.fold_steps, self.fold_gain = self._fold(o, i, v, _positive_int(fold, "fold"))

        # One sort by (out ct, in ct, diagonal mod slots, out unit) groups the entries by block diagonal
        # and puts duplicated (o, i) pairs side by side (o and d determine i); they are summed, zeros dropped.
        oc, ol = np.divmod(o, self.per_ct)
        ic, il = np.divmod(i, self.per_ct)
        dm = ((il - ol) * self.width) % self.slots
        key = ((oc * self.n_in_cts + ic) * self.slots + dm) * self.per_ct + ol
        order = np.argsort(key)
        key = key[order]
        first = np.flatnonzero(np.diff(key, prepend=-1)) if key.size else np.zeros(0, dtype=np.int64)
        val = np.add.reduceat(v[order], first) if key.size else np.zeros(0)
        del order
        if not np.all(np.isfinite(val)):
            raise InvalidInput("summed duplicate values overflow to inf")
        keep = val != 0.0
        key, self._val = key[first[keep]], val[keep]
        key, self._val, self._groups = self._merge_equal_inputs(key, self._val)
        rest, ol = np.divmod(key, self.per_ct)
        self._slot = (ol * self.width).astype(np.int32)  # first output slot of each entry
        blk, dm = np.divmod(rest, self.slots)
        first = np.flatnonzero(np.diff(rest, prepend=-1)) if rest.size else np.zeros(0, dtype=np.int64)
        bounds = np.append(first, rest.size)
        gc, ga = np.divmod(blk[first], self.n_in_cts)
        gd = dm[first]
        gd[gd > self.slots // 2] -= self.slots  # representative in (-slots/2, slots/2]
        self._bounds = {
            (int(c), int(a), int(x)): (int(lo), int(hi))
            for c, a, x, lo, hi in zip(gc, ga, gd, bounds[:-1], bounds[1:], strict=True)
        }
        self.entry_count = int(rest.size)

        # Baby-step giant-step split, in units of the diagonals' gcd.
        nz = np.abs(gd[gd != 0])
        self.unit = int(np.gcd.reduce(nz)) if nz.size else 1
        e = gd // self.unit
        used_in, used_out = np.unique(ga), np.unique(gc)
        if e.size:
            reach = max(int(e.max()), -int(e.min()), int(e.max() - e.min())) + 1
            kmax = max(1, min(reach, self.slots // (2 * self.unit)))
            e_in = [np.unique(e[ga == a]) for a in used_in]
            e_out = [np.unique(e[gc == c]) for c in used_out]
            self.k = _block_split(e_in, e_out, kmax, key_mode)
        else:
            self.k = 1
        self.step = self.k * self.unit
        g, b = np.divmod(e, self.k)
        # terms[c][g] = [(a, b, d)]; babies[a] = baby steps (in units) input a needs
        self._terms: dict[int, dict[int, list[tuple[int, int, int]]]] = {}
        babies: dict[int, set[int]] = {int(a): set() for a in used_in}
        for c, a, x, gg, bb in zip(gc.tolist(), ga.tolist(), gd.tolist(), g.tolist(), b.tolist(), strict=True):
            self._terms.setdefault(c, {}).setdefault(gg, []).append((a, bb, x))
            babies[a].add(bb)
        self._babies = {a: sorted(s - {0}) for a, s in babies.items()}
        if key_mode == "direct":
            self.baby_count = sum(len(s) for s in self._babies.values())
            self.giant_count = sum(len(set(t) - {0}) for t in self._terms.values())
        else:
            self.baby_count = sum(max(s, default=0) for s in self._babies.values())
            self.giant_count = sum(max(max(t), 0) - min(min(t), 0) for t in self._terms.values())
        self.diagonal_count = len(self._bounds)
        n_bias = 0
        if self.bias is not None:
            n_bias = int(np.count_nonzero(np.any(self.bias.reshape(self.n_out_cts, self.per_ct) != 0.0, axis=1)))
        self.plaintext_count = self.diagonal_count + n_bias

    def _fold(self, o: np.ndarray, i: np.ndarray, v: np.ndarray, period: int) -> tuple[np.ndarray, list[int], float]:
        """Output row o's entry with input i goes to copy t = (i - o + span - 1) // period at slot o + t*period,
        so every diagonal lies in (-span, period - span]: at most ``period`` diagonals (instead of up to
        n + m - 1 for an m x n map with m < n), one product each, shared by all copies. After the rescale,
        log2(copies) rotate-and-adds sum the copies into slot o (the hybrid diagonal method, Juvekar et al.,
        GAZELLE 2018). Slots outside the output units then hold partial sums of rows, never more than
        max_o sum |W_o| * max |x|: the returned gain, which the caller must bound."""
        if self.n_in_cts != 1 or self.n_out_cts != 1 or self.width != 1:
            raise InvalidInput("fold needs one input and one output ciphertext of width 1 (latency layout)")
        span = int(o.max()) + 1 if o.size else 1
        if period < span:
            raise InvalidInput(f"fold period {period} is shorter than the output span {span}")
        t = (i - o + span - 1) // period
        levels = max(0, (int(t.max()) if t.size else 0)).bit_length()
        if span + ((1 << levels) - 1) * period > self.slots:
            raise InvalidInput(f"a fold of period {period} with {1 << levels} copies exceeds {self.slots} slots")
        gain = float(np.bincount(o, weights=np.abs(v)).max()) if o.size else 0.0
        return o + t * period, [period << j for j in range(levels)], gain

    def _fold_sum(self, ctx: CKKSContext, acc: Any) -> Any:
        """Sum the output copies into the output units by rotate-and-add (:meth:`_fold`)."""
        for step in self.fold_steps:
            ctx.add_inplace(acc, ctx.rotate(acc, step))
        return acc

    def _merge_equal_inputs(self, key: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Input ciphertexts whose block diagonals are all equal are added first and read once.

        sum_a diag_a * rot(x_a) = diag * rot(sum_a x_a) when every diag_a is the same: a pooling fused into
        the next map (phase packing: the pooled cells sit in different ciphertexts at equal positions) then
        costs ciphertext additions instead of one product and baby rotations per cell. Returns the entries
        of the group representatives and {representative: [members]} for groups of two or more."""
        if key.size == 0 or self.n_in_cts == 1:
            return key, val, {}
        rest, ol = np.divmod(key, self.per_ct)
        blk, dm = np.divmod(rest, self.slots)
        oc, ic = np.divmod(blk, self.n_in_cts)
        # entries are sorted by (oc, ic, dm, ol): per input ct, (oc, dm, ol) come out in one canonical order
        order = np.argsort(ic, kind="stable")
        starts = np.searchsorted(ic[order], np.arange(self.n_in_cts + 1))
        reps: dict[bytes, int] = {}
        groups: dict[int, list[int]] = {}
        for a in range(self.n_in_cts):
            sel = order[starts[a]:starts[a + 1]]
            if sel.size == 0:
                continue
            sig = b"".join(x[sel].tobytes() for x in (oc, dm, ol, val))
            groups.setdefault(reps.setdefault(sig, a), []).append(a)
        groups = {r: m for r, m in groups.items() if len(m) > 1}
        if not groups:
            return key, val, {}
        drop = np.zeros(self.n_in_cts, dtype=bool)
        for members in groups.values():
            drop[members[1:]] = True
        keep = ~drop[ic]
        return key[keep], val[keep], groups

    @classmethod
    def from_dense(
        cls, weight: np.ndarray, bias: np.ndarray | None, slots: int, key_mode: str = "direct"
    ) -> BlockMatVec:
        """y = W x + b on one ciphertext (x in slots [0, n), y in [0, m)), width 1; n, m <= slots."""
        w = _finite_matrix(weight)
        m, n = w.shape
        if m > slots or n > slots:
            raise InvalidInput(f"a {m}x{n} matrix does not fit one ciphertext of {slots} slots")
        b = _bias_vector(bias, m)
        full = None
        if b is not None:
            full = np.zeros(slots)
            full[:m] = b
        rows, cols = np.nonzero(w)
        return cls(rows, cols, w[rows, cols], 1, 1, slots, 1, full, key_mode)

    @property
    def rotation_count(self) -> int:
        """Rotations per :meth:`apply` (fewer only if whole groups of products round to zero)."""
        return self.baby_count + self.giant_count + len(self.fold_steps)

    @property
    def mult_count(self) -> int:
        """Ciphertext-plaintext products per :meth:`apply` (one per non-zero block diagonal)."""
        return self.diagonal_count

    def rotation_steps(self) -> set[int]:
        """Rotation steps the plan needs Galois keys for (negative steps allowed)."""
        if self.key_mode == "direct":
            steps = {b * self.unit for s in self._babies.values() for b in s}
            steps |= {g * self.step for t in self._terms.values() for g in t if g != 0}
            return steps | set(self.fold_steps)
        steps = set(self.fold_steps)
        if any(self._babies.values()):
            steps.add(self.unit)
        gs = [g for t in self._terms.values() for g in t]
        if gs and max(gs) > 0:
            steps.add(self.step)
        if gs and min(gs) < 0:
            steps.add(-self.step)
        return steps

    def noise_shape(self) -> tuple[int, int, int]:
        """(rotations chained before a product, giant rotations summed into one output ciphertext, products
        summed into one output slot) at worst: what a keyless noise bound of :meth:`apply` needs."""
        if self.key_mode == "direct":
            chain = 1 if any(self._babies.values()) else 0
            giants = max((len(set(t) - {0}) for t in self._terms.values()), default=0)
        else:
            chain = max((max(s, default=0) for s in self._babies.values()), default=0)
            giants = max((max(max(t), 0) - min(min(t), 0) for t in self._terms.values()), default=0)
        giants += len(self.fold_steps)
        per_out: dict[int, int] = {}
        for c, a, _ in self._bounds:  # a merged input is a sum of its members' ciphertexts
            per_out[c] = per_out.get(c, 0) + len(self._groups.get(a, (a,)))
        return chain, giants, max(per_out.values(), default=0)

    def rotation_uses(self) -> dict[int, int]:
        """Rotation step -> rotations by it per :meth:`apply` (what choosing the Galois keys weighs)."""
        uses: dict[int, int] = dict.fromkeys(self.fold_steps, 1)
        if self.key_mode == "direct":
            for s in self._babies.values():
                for b in s:
                    uses[b * self.unit] = uses.get(b * self.unit, 0) + 1
            for t in self._terms.values():
                for g in t:
                    if g != 0:
                        uses[g * self.step] = uses.get(g * self.step, 0) + 1
            return uses
        babies = sum(max(s, default=0) for s in self._babies.values())
        if babies:
            uses[self.unit] = uses.get(self.unit, 0) + babies
        for t in self._terms.values():
            if max(t) > 0:
                uses[self.step] = uses.get(self.step, 0) + max(t)
            if min(t) < 0:
                uses[-self.step] = uses.get(-self.step, 0) - min(t)
        return uses

    def _diag(self, c: int, a: int, d: int, g: int) -> np.ndarray:
        """Block diagonal d of (out ct c, in ct a) as a slot vector, pre-rotated right by g*k*unit."""
        lo, hi = self._bounds[(c, a, d)]
        pos = self._slot[lo:hi, None] + np.arange(self.width) + g * self.step
        vec = np.zeros(self.slots)
        vec[pos.reshape(-1) % self.slots] = np.repeat(self._val[lo:hi], self.width)
        return vec

    def _bias_block(self, c: int) -> np.ndarray | None:
        blk = self.bias[c * self.per_ct : (c + 1) * self.per_ct]
        if not np.any(blk):
            return None
        vec = np.zeros(self.slots)
        vec[: self.per_ct * self.width] = np.repeat(blk, self.width)
        return vec

    def _babies_of(self, ctx: CKKSContext, a: int, ct: Any) -> dict[int, Any]:
        baby = {0: ct}
        if self.key_mode == "direct":
            for b in self._babies[a]:
                baby[b] = ctx.rotate(ct, b * self.unit)
        else:
            for b in range(1, max(self._babies[a], default=0) + 1):
                baby[b] = ctx.rotate(baby[b - 1], self.unit)
        return baby

    def apply(self, ctx: CKKSContext, cts: Sequence[Any]) -> list:
        """Encrypted W x + b for ``n_in_cts`` ciphertexts: ``n_out_cts`` ciphertexts one level down, canonical.

        Inputs at different levels are first brought to the lowest one (:meth:`CKKSContext.to_canonical`,
        one extra product each); inputs no entry reads are ignored.
        """
        if ctx.slots != self.slots:
            raise InvalidInput(f"plan built for {self.slots} slots, context has {ctx.slots}")
        cts = list(cts)
        if len(cts) != self.n_in_cts:
            raise InvalidInput(f"BlockMatVec.apply expects {self.n_in_cts} ciphertexts, got {len(cts)}")
        levels = [ctx.level(ct) for ct in cts]
        low = int(np.argmin(levels))
        lvl = ctx.need_levels(cts[low], 1, "BlockMatVec.apply")
        target = ctx.scale_at(lvl - 1)
        prod = target * ctx.prime(lvl)  # scale of every product before the rescale
        ctx.check_product_scale(prod, lvl, "BlockMatVec.apply")
        baby, pscale = {}, {}
        for a in self._babies:
            members = [cts[m] if levels[m] == lvl else ctx.to_canonical(cts[m], lvl) for m in self._groups.get(a, (a,))]
            ct = members[0]
            for other in members[1:]:
                ct = ctx.add(ct, other)
            pscale[a] = prod / ct.scale
            baby[a] = self._babies_of(ctx, a, ct)
        tmp = seal.Ciphertext()
        out = []
        for c in range(self.n_out_cts):
            inner = {}
            for g, terms in sorted(self._terms.get(c, {}).items()):
                acc = None
                for a, b, d in terms:
                    pt = ctx.encode(
                        lambda c=c, a=a, d=d, g=g: self._diag(c, a, d, g), lvl, pscale[a], key=(self._key, c, a, d)
                    )
                    dst = seal.Ciphertext() if acc is None else tmp
                    if ctx.mul_encoded(baby[a][b], pt, dst) is None:  # the diagonal rounds to zero
                        continue
                    dst.scale = prod  # equal up to rounding across inputs of different scales
                    if acc is None:
                        acc = dst
                    else:
                        ctx.add_inplace(acc, dst)
                inner[g] = acc
            if self.rescale_first:
                for v in inner.values():
                    if v is not None:
                        ctx.rescale_inplace(v, target)
            if self.key_mode == "direct":
                parts = [v if g == 0 or v is None else ctx.rotate(v, g * self.step) for g, v in inner.items()]
            else:
                g_lo, g_hi = min(min(inner, default=0), 0), max(max(inner, default=0), 0)
                parts = [
                    inner.get(0),
                    _horner_sum(ctx, inner, range(1, g_hi + 1), self.step),
                    _horner_sum(ctx, inner, range(-1, g_lo - 1, -1), -self.step),
                ]
            acc = _sum_parts(ctx, parts)
            if acc is None:
                acc = ctx.zero(lvl - 1, target)
            else:
                # the copies' sum: before the rescale its rotations' noise is divided by the prime too; after it
                # (rescale_first plans, whose scale has bits to spare) each key switch is one prime cheaper
                acc = self._fold_sum(ctx, acc)
                if not self.rescale_first:
                    ctx.rescale_inplace(acc, target)
            if self.bias is not None:
                vec = self._bias_block(c)
                if vec is not None:
                    ctx.add_encoded_inplace(acc, ctx.encode(vec, lvl - 1, target, key=(self._key, "bias", c)))
            out.append(acc)
        return out


KEY_SWITCH_PRODUCTS = 20  # a key switch costs about 20 ciphertext x plaintext products (measured here: 11.6 ms vs
# 0.59 ms at N=8192 with 8 primes, privml.compiler.costs): what choosing a fold period weighs


def cheapest_matvec(out_idx: np.ndarray, in_idx: np.ndarray, values: np.ndarray, slots: int,
                    bias: np.ndarray | None = None, key_mode: str = "direct",
                    rescale_first: bool = False) -> BlockMatVec:
    """The block product of a map between one ciphertext and one ciphertext (width 1), plain or folded
    (:meth:`BlockMatVec._fold`), whichever needs the fewest key switches (x KEY_SWITCH_PRODUCTS) plus products.
    A folded product leaves bounded partial sums outside its output units (``fold_gain``)."""
    best = BlockMatVec(out_idx, in_idx, values, 1, 1, slots, 1, bias, key_mode, rescale_first=rescale_first)
    if np.size(out_idx) == 0:
        return best
    m, n = int(np.max(out_idx)) + 1, int(np.max(in_idx)) + 1

    def cost(mv: BlockMatVec) -> int:
        return KEY_SWITCH_PRODUCTS * mv.rotation_count + mv.mult_count

    periods = {m} | {-(-(n + m - 1) // f) for f in (2, 4, 8, 16, 32)}
    for period in sorted(p for p in periods if p >= m):
        try:
            mv = BlockMatVec(out_idx, in_idx, values, 1, 1, slots, 1, bias, key_mode, fold=period,
                             rescale_first=rescale_first)
        except InvalidInput:  # its copies do not fit the slots
            continue
        if cost(mv) < cost(best):
            best = mv
    return best


# ------------------------------------------------------------------------------------------------
# Polynomials


def _coeff_list(coeffs: Sequence[float]) -> list[float]:
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise InvalidInput("a polynomial needs at least one coefficient")
    if not np.all(np.isfinite(c)):
        raise InvalidInput("polynomial coefficients contain NaN or inf")
    nz = np.nonzero(c)[0]
    d = int(nz[-1]) if nz.size else 0
    return c[: d + 1].tolist()


def _degree(c: Sequence[float]) -> int:
    for i in range(len(c) - 1, -1, -1):
        if c[i] != 0.0:
            return i
    return 0


def _power_depth(i: int) -> int:
    """Depth of x**i built as x**(2**j) * x**(i - 2**j): ceil(log2(i))."""
    return (i - 1).bit_length()


def _power_closure(exps: set[int]) -> set[int]:
    """Every power needed to build x**i for i in ``exps`` (x**1 excluded: it is the input)."""
    out: set[int] = set()
    todo = [i for i in exps if i > 1]
    while todo:
        i = todo.pop()
        if i in out or i <= 1:
            continue
        out.add(i)
        hi = 1 << (i.bit_length() - 1)
        todo.extend([hi // 2, hi // 2] if hi == i else [hi, i - hi])
    return out


def _plan(c: list[float], budget: int, have: frozenset[int]) -> tuple[int, frozenset[int], tuple | None]:
    """Cheapest way (ct-ct multiplications) to get sum_{i>=1} c_i x^i within ``budget`` levels.

    Two shapes, chosen by cost given the powers already built (``have``):
    ("direct", exps): each c_i * x^i is a ct-pt product of a shared power x^i
    (allowed when every x^i has a spare level for its scalar); ("split", P, low, high):
    low(x) + x^P * high(x), high evaluated one level above the target.
    """
    d = _degree(c)
    exps = {i for i in range(1, d + 1) if c[i] != 0.0}
    if not exps:
        return 0, have, None
    options = []
    if max(_power_depth(i) for i in exps) + 1 <= budget:
        closure = _power_closure(exps)
        options.append((len(closure - have), have | closure, ("direct", tuple(sorted(exps)))))
    if d >= 2:
        half = 1 << (d.bit_length() - 1)
        low, high = c[:half], c[half : d + 1]
        cost0, have0, tree0 = _plan(low, budget, have)
        pw = _power_closure({half})
        cost = cost0 + len(pw - have0)
        have1 = have0 | pw
        if _degree(high) == 0:
            options.append((cost, have1, ("split", half, tree0, None)))
        else:
            cost1, have2, tree1 = _plan(high, budget - 1, have1)
            options.append((cost + cost1 + 1, have2, ("split", half, tree0, tree1)))
    return min(options, key=lambda o: o[0])


class _PolyRun:
    """Executes a :func:`_plan` tree; every node lands exactly on its target level and scale."""

    def __init__(self, ctx: CKKSContext, x: Any) -> None:
        self.ctx = ctx
        self.powers: dict[int, Any] = {1: x}

    def power(self, i: int) -> Any:
        if i not in self.powers:
            hi = 1 << (i.bit_length() - 1)
            a, b = (self.power(hi // 2),) * 2 if hi == i else (self.power(hi), self.power(i - hi))
            self.powers[i] = self.ctx.mul_exact(a, b)
        return self.powers[i]

    def run(self, c: list[float], tree: tuple | None, level: int, scale: float) -> Any:
        """sum_{i>=1} c_i x^i at exactly (level, scale); None when the tree is empty."""
        if tree is None:
            return None
        ctx = self.ctx
        if tree[0] == "direct":
            # Lazy sum: all products at level+1 with scale `scale * q`, then one rescale.
            q = ctx.prime(level + 1)
            acc, tmp = None, seal.Ciphertext()
            for i in tree[1]:
                pw = self.power(i)
                src = ctx.mod_switch_to_level(pw, level + 1) if ctx.level(pw) > level + 1 else pw
                pt = ctx.encode(c[i], level + 1, scale * q / pw.scale)
                dst = seal.Ciphertext() if acc is None else tmp
                if ctx.mul_encoded(src, pt, dst) is None:  # coefficient rounds to zero
                    continue
                dst.scale = scale * q
                if acc is None:
                    acc = dst
                else:
                    ctx.add_inplace(acc, dst)
            if acc is None:
                return ctx.zero(level, scale)
            ctx.rescale_inplace(acc, scale)
            return acc
        _, half, tree0, tree1 = tree
        d = _degree(c)
        low, high = c[:half], c[half : d + 1]
        r0 = self.run(low, tree0, level, scale)
        pw = self.power(half)
        if tree1 is None:
            term = ctx.mul_scalar_to(pw, high[0], level, scale)
        else:
            s1 = scale * ctx.prime(level + 1) / pw.scale
            r1 = self.run(high, tree1, level + 1, s1)
            if high[0] != 0.0:
                ctx.add_encoded_inplace(r1, ctx.encode(high[0], level + 1, s1))
            term = ctx.mul_exact(ctx.mod_switch_to_level(pw, level + 1), r1)
            term.scale = scale
        if r0 is not None:
            r0.scale = scale
            ctx.add_inplace(term, r0)
        return term


def poly_mult_count(coeffs: Sequence[float]) -> int:
    """Ciphertext-ciphertext multiplications :func:`eval_poly` performs for ``coeffs``."""
    c = _coeff_list(coeffs)
    return _plan(c, poly_depth(len(c) - 1), frozenset())[0]


def eval_poly(ctx: CKKSContext, ct: Any, coeffs: Sequence[float]) -> Any:
    """sum_i coeffs[i] * x**i slot-wise, consuming exactly ``poly_depth(degree)`` levels.

    Scalars ride on ct-pt products whose plaintext scale is chosen so each term lands on
    the target scale (no extra level); the plan mixes shared powers x^i (each built
    once) and splits p = low + x^(2^j) high, whichever needs fewer ct-ct products, and
    zero coefficients (odd/even polynomials) cost nothing.  Intermediate terms may exceed
    the final value: CKKS arithmetic is exact modulo Q, so only the final value (and the
    constant term, which SEAL encodes at the last level) need the first prime's headroom.
    """
    c = _coeff_list(coeffs)
    d = len(c) - 1
    depth = poly_depth(d)
    lvl = ctx.need_levels(ct, depth, f"a degree-{d} polynomial")
    if d == 0:
        return ctx.add_scalar(ctx.zero(lvl, ct.scale), c[0])
    target = lvl - depth
    scale = ctx.scale_at(target)
    _, _, tree = _plan(c, depth, frozenset())
    out = _PolyRun(ctx, ct).run(c, tree, target, scale)
    if c[0] != 0.0:
        ctx.add_encoded_inplace(out, ctx.encode(c[0], target, scale))
    return out


# ------------------------------------------------------------------------------------------------
# Throughput layout


def _sparse_rows(weight: Any) -> Any:
    """``weight`` (dense or scipy sparse) as a finite CSR matrix with sorted column indices."""
    import scipy.sparse as sp

    w = sp.csr_matrix(weight if sp.issparse(weight) else _finite_matrix(weight), dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise InvalidInput(f"weight must be a non-empty 2-D matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w.data)):
        raise InvalidInput("weight contains NaN or inf")
    w.eliminate_zeros()
    w.sort_indices()
    return w


def dense_throughput(ctx: CKKSContext, cts: list, weight: Any, bias: np.ndarray | None) -> list:
    """out_j = sum_i W[j, i] * cts[i] + b_j with one sample per slot; consumes one level.

    Zero weights are skipped (and weights that round to zero at the plaintext scale); the
    products of a row accumulate at one scale and each output is rescaled once.  A weight
    repeated consecutively in a row is encoded once.
    """
    w = _sparse_rows(weight)
    m, n = w.shape
    if len(cts) != n:
        raise InvalidInput(f"weight has {n} input columns but {len(cts)} ciphertexts were given")
    b = _bias_vector(bias, m)
    levels = [ctx.level(c) for c in cts]
    lvl = min(levels)
    if lvl < 1:
        raise DepthExhausted(
            f"dense layer needs 1 more level but an input is at level {lvl} (parameters have depth {ctx.params.depth})"
        )
    cts = [c if lv == lvl else ctx.to_canonical(c, lvl) for c, lv in zip(cts, levels, strict=True)]
    target = ctx.scale_at(lvl - 1)
    q = ctx.prime(lvl)
    pscale = [target * q / c.scale for c in cts]
    for c, p in zip(cts, pscale, strict=True):
        ctx.check_product_scale(c.scale * p, lvl, "dense_throughput")

    # Row by row: the accumulator stays in cache while the inputs stream past it, and each
    # scalar is encoded right before use (a SEAL scalar encode is ~1/10 of a ct-pt product and
    # leaves the plaintext hot).  Measured (N=8192, 6 primes, TutorialCNN conv rows): 0.47 ms
    # per product this way vs 0.55 ms with a per-value plaintext cache and 0.58 ms grouping
    # the products by weight value (the cached plaintexts evict the accumulator).
    tmp = seal.Ciphertext()
    out = []
    for j in range(m):
        acc = None
        last: tuple[float, float, Any] | None = None
        lo, hi = w.indptr[j], w.indptr[j + 1]
        for i, value in zip(w.indices[lo:hi].tolist(), w.data[lo:hi].tolist(), strict=True):
            p = pscale[i]
            if abs(value) * p < 0.5:  # rounds to zero at this scale: SEAL would refuse the product
                continue
            if last is not None and last[0] == value and last[1] == p:
                pt = last[2]
            else:
                pt = ctx.encode(value, lvl, p)
                last = (value, p, pt)
            if acc is None:
                acc = ctx.mul_encoded(cts[i], pt)
            elif ctx.mul_encoded(cts[i], pt, tmp) is not None:
                ctx.add_inplace(acc, tmp)
        if acc is None:
            acc = ctx.zero(lvl - 1, target)
        else:
            ctx.rescale_inplace(acc, target)
        if b is not None and b[j] != 0.0:
            ctx.add_encoded_inplace(acc, ctx.encode(float(b[j]), lvl - 1, target))
        out.append(acc)
    return out


def poly_value_bound(coeffs: Sequence[float], x_bound: float = 1.0, grid: int = 2001) -> float:
    """Max |p(x)| on [-x_bound, x_bound] (sampled): the headroom the final value needs."""
    c = _coeff_list(coeffs)
    xs = np.linspace(-x_bound, x_bound, grid)
    return float(np.max(np.abs(np.polynomial.polynomial.polyval(xs, c))))
