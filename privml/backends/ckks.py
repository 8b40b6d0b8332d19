"""The ``ckks`` backend: unmodified models on CKKS ciphertexts (TenSEAL's raw SEAL underneath).

``CKKSTensor`` only routes; the maths lives in ``privml.he`` (parameters, guarded
evaluation, baby-step giant-step matrix products, minimal-depth polynomials).

Every linear op (``F.linear``, ``F.conv2d`` at any stride/padding/dilation/groups,
pooling, folded or unfolded BatchNorm, flatten/reshape, sums, means, plain additions
and scalings) is turned into a *sparse* affine map on the per-sample flattened vector
(:mod:`privml.backends.linmaps`: generated from the op's structure, never a dense
n x n matrix). Consecutive linear ops are *fused*: the tensor keeps a ``pending``
affine map and only materializes it (one level, one block diagonal product) when a
non-linear op needs the value. So ``conv -> avgpool`` or ``avgpool -> flatten ->
linear`` cost one level, not two or three.

A tensor's ``packing`` (:mod:`privml.he.packing`) says where its payload's values
live; two layouts share the same routing:

* ``latency``: each sample in its own ciphertexts (as many as it needs: a CIFAR
  16x32x32 feature map spans several), feature maps in a multiplexed grid packing so
  strided convolutions and pooling waste no slots; a linear map is one
  ``BlockMatVec`` (baby-step giant-step over the blocks' cyclic diagonals).
* ``throughput``: the batch across slots, one feature per ciphertext (up to N/2
  samples); a linear map is scalar multiply-adds with no rotation at all.

A ``DryRuntime`` runs the same routing without keys or ciphertexts: compile uses
it to count the exact depth, the rotation steps (Galois keys) and the slots the
model needs before any key exists.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils._pytree import tree_map

from privml.errors import DepthExhausted, InvalidInput, KeyMaterialError, MalformedInput, PrivmlError
from privml.he import packing as packings
from privml.he.packing import Packing
from privml.registry import REGISTRY
from privml.tensor import PrivateTensor, current_module, out_of_place
from privml.tensor.base import op_name, unsupported

LAYOUTS = ("latency", "throughput")
# Encoded diagonals are cached per (layer, level): large enough for the reference models at N=16384
# (TutorialCNN needs ~0.9 GB); an LRU that is too small for one forward pass would never hit.
PLAINTEXT_CACHE_BYTES = 4 << 30
aten = torch.ops.aten


# --------------------------------------------------------------------------------------------- affine maps
@dataclass
class Affine:
    """y = weight @ x + bias on the flattened sample (``weight``: sparse CSR); ``names``: the fused ops."""

    weight: sp.csr_matrix
    bias: np.ndarray
    key: tuple
    names: tuple[str, ...]

    def then(self, other: Affine) -> Affine:
        """This map followed by ``other``."""
        return Affine(sp.csr_matrix(other.weight @ self.weight), other.weight @ self.bias + other.bias,
                      self.key + other.key, self.names + other.names)


def _tensor_key(t: torch.Tensor) -> tuple:
    """A plain tensor's cache key from its content (dtype, shape, blake2b of the bytes).

    Not ``id(t)``: CPython reuses the ids of freed temporaries, so an id-based key once returned the
    affine map (and encoded diagonals) of an earlier, different operand."""
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    raw = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    return ("T", str(t.dtype), tuple(t.shape), hashlib.blake2b(raw, digest_size=32).digest())


def _arg_key(a: object) -> object:
    """A cache key for an op argument: the encrypted operand by shape only (it changes every call, the
    affine map does not), plain tensors and arrays by content, containers element-wise, anything else by value."""
    if isinstance(a, PrivateTensor):
        return ("X", tuple(a.shape[1:]))
    if isinstance(a, torch.Tensor):
        return _tensor_key(a)
    if isinstance(a, np.ndarray):
        return _tensor_key(torch.from_numpy(np.ascontiguousarray(a)))
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_arg_key(x) for x in a))
    if isinstance(a, dict):
        return ("dict", *sorted((str(k), _arg_key(v)) for k, v in a.items()))
    return (type(a).__name__, repr(a))


def extract_affine(fn: Callable[[torch.Tensor], torch.Tensor], sample_shape: tuple[int, ...]
                   ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(W, b, output sample shape) of an affine per-sample function, from the identity basis."""
    n = int(np.prod(sample_shape)) if sample_shape else 1
    with torch.no_grad():
        zero = fn(torch.zeros((1, *sample_shape), dtype=torch.float64))
        basis = fn(torch.eye(n, dtype=torch.float64).reshape(n, *sample_shape))
    if basis.shape[0] != n or zero.shape[0] != 1:
        raise InvalidInput("privml: this op mixes samples of the batch; the CKKS backend needs ops that act on "
                           "each sample independently (batch first).")
    b = zero.reshape(-1).numpy().copy()
    w = (basis.reshape(n, -1) - zero.reshape(1, -1)).T.numpy().copy()
    w[np.abs(w) < 1e-300] = 0.0
    return w, b, tuple(basis.shape[1:])


# --------------------------------------------------------------------------------------------- runtimes
class ExpandedInput(list):
    """Fresh latency-layout ciphertexts holding the client-side expansion x' of the input (see
    ``privml.he.expansion``): the first linear map applied to them uses the expanded weight."""


def _not_expanded(*payloads: Any) -> None:
    """Expanded inputs only make sense to the first linear map the plan built them for."""
    if any(isinstance(p, ExpandedInput) for p in payloads):
        raise PrivmlError("privml: this encrypted input is laid out for the model's first linear layer (input "
                          "expansion); it cannot be decrypted or used by another op. Compile with "
                          "input_expansion=False to encrypt inputs as they are.")


def _progress(items: list, what: str) -> Any:
    """A progress bar over many ciphertexts (throughput layout: hundreds of features), silent for few."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"ckks {what}", unit="ct", leave=False, disable=len(items) < 64)


class Spilled(list):
    """Ciphertexts whose slots outside the packing's units hold values of magnitude up to ``spill`` (the partial
    sums a folded product leaves, :meth:`privml.he.kernels.BlockMatVec._fold`, and what later ops make of them).
    The next linear map never reads them, decryption ignores them; the runtime bounds them so that they never
    overflow a level's modulus (which would corrupt every slot)."""

    spill = 0.0


def _spill(payload: Any) -> float:
    return float(getattr(payload, "spill", 0.0))


def _sources(*payloads: Any) -> frozenset[str]:
    """The folded maps a dry run's spill comes from (empty for real payloads: only the planner needs them)."""
    return frozenset().union(*(getattr(p, "spill_from", frozenset()) for p in payloads))


def map_name(affine: Affine) -> str:
    """A (fused) linear map's name in plans and logs: its ops' names joined by '+'."""
    return "+".join(dict.fromkeys(affine.names))


def spill_after_poly(coeffs: list[float], spill: float) -> float:
    """A bound on every value a polynomial's evaluation makes from inputs of magnitude up to ``spill``."""
    if not spill:
        return 0.0
    degree = max((i for i, c in enumerate(coeffs) if c), default=0)
    log = math.log(max(1.0, sum(abs(c) for c in coeffs))) + degree * math.log(max(1.0, spill))
    return math.exp(log) if log < 700 else math.inf


def spill_after_product(a: float, b: float) -> float:
    """A bound on a product's values outside the units, from its operands' (each at least ~0 there)."""
    return (a + 1.0) * (b + 1.0) - 1.0 if a or b else 0.0


def build_matvec(affine: Affine, src: Packing, dst: Packing, slots: int, expansion: Any = None,
                 key_mode: str = "direct", fold: bool = False, rescale_first: bool = False) -> Any:
    """The block diagonal product computing ``affine`` from packing ``src`` into packing ``dst``; with ``fold``
    (one ciphertext in and out, width 1) the folded product where that is cheaper (``rescale_first``: see
    :class:`privml.he.kernels.BlockMatVec`)."""
    from privml.he.kernels import BlockMatVec, cheapest_matvec

    w = affine.weight
    if expansion is not None:  # the first layer on the client-expanded input x' (privml.he.expansion)
        w = sp.csr_matrix(expansion.weight(w.toarray()))
    coo = w.tocoo()
    bias = None
    if affine.bias is not None and np.any(affine.bias):
        bias = np.zeros(dst.n_cts * dst.per_ct)
        bias[dst.units] = affine.bias
    if fold and src.n_cts == dst.n_cts == 1 and src.width == 1:
        return cheapest_matvec(dst.units[coo.row], src.units[coo.col], coo.data, slots, bias, key_mode,
                               rescale_first)
    return BlockMatVec(dst.units[coo.row], src.units[coo.col], coo.data, src.n_cts, dst.n_cts, slots,
                       width=src.width, bias=bias, key_mode=key_mode)


class Runtime:
    """Executes payload-level ops for one context and layout; caches affine maps and encoded diagonals.

    A payload is a flat list of ciphertexts: in the latency layout sample after sample, each sample
    ``packing.n_cts`` ciphertexts; in the throughput layout ``packing.n_cts`` ciphertexts for the batch."""

    def __init__(self, ctx: Any, layout: str, expansion: Any = None, key_mode: str = "direct",
                 lanes: int | None = None, split_before: frozenset[str] = frozenset(),
                 fold_bound: float | None = None, no_fold: frozenset[str] = frozenset(),
                 rescale_first: bool = False) -> None:
        if layout not in LAYOUTS:
            raise InvalidInput(f"privml: layout must be one of {LAYOUTS}, got {layout!r}")
        if fold_bound is not None and not (isinstance(fold_bound, (int, float)) and 0 < fold_bound < math.inf):
            raise MalformedInput(f"privml: the plan's fold_bound must be a positive number, got {fold_bound!r}")
        self.ctx = ctx
        # latency layout: fold single-ciphertext products where cheaper; fold_bound bounds every value they read
        self.fold_bound = float(fold_bound) if fold_bound is not None and layout == "latency" else None
        self.no_fold = frozenset(no_fold)  # maps (by name) the plan applies unfolded: their spill would overflow
        self.rescale_first = rescale_first is True  # the plan's scale has bits to spare for giant-step noise
        self.layout = layout
        self.lanes = lanes  # throughput layout: samples per unit (None: every slot, one feature per ciphertext)
        self.expansion = expansion  # privml.he.expansion.InputExpansion for the first layer (latency only)
        self.key_mode = key_mode
        self.split_before = frozenset(split_before)  # ops applied on their own, not fused into a pending map
        self.fusion_points: dict[str, str] = {}  # op -> the pending mixing map it met (the planner's choices)
        self.mixing_steps: dict[str, int] = {}  # op -> position-mixing maps it applied (1, or 2: more; a dry run
        # routes one pass)
        self._mixing: dict[tuple, bool] = {}
        self._affine_cache: dict[tuple, tuple[sp.csr_matrix, np.ndarray, tuple[int, ...]]] = {}
        self._matvec_cache: dict[tuple, Any] = {}

    def _mixes(self, affine: Affine) -> bool:
        """Whether ``affine`` moves values between positions (a conv, pool, linear), not only scales them."""
        hit = self._mixing.get(affine.key)
        if hit is None:
            w = affine.weight
            rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
            hit = self._mixing[affine.key] = w.shape[0] != w.shape[1] or bool((w.indices != rows).any())
        return hit

    def fuses(self, pending: Affine | None, step: Affine) -> bool:
        """Whether ``step`` is composed into ``pending`` (one level, the product's diagonals) or ``pending`` is
        applied first (two levels, each map's own diagonals): the plan's ``split_before`` decides where both
        maps mix positions; the rest (scales, biases, BatchNorm) always fuse. ``mixing_steps`` counts the
        position-mixing maps per op name: a split is named by its op, so only a name holding one map can be split."""
        if not self._mixes(step):
            return True
        name = step.names[-1]
        if len(self.mixing_steps) < 1 << 16:  # a bounded table, whatever the model calls
            self.mixing_steps[name] = min(self.mixing_steps.get(name, 0) + 1, 2)
        if pending is None or not self._mixes(pending):
            return True
        self.fusion_points.setdefault(name, "+".join(dict.fromkeys(pending.names)))
        return name not in self.split_before

    @property
    def slots(self) -> int:
        return self.ctx.slots

    @property
    def width(self) -> int:
        """Slots per feature in the throughput layout: the plan's lanes, else the whole ciphertext."""
        return self.lanes or self.slots

    def affine_of(self, key: tuple, op: tuple, sample_shape: tuple[int, ...]) -> tuple:
        """(W, b, output shape) of the op ``(func, args, kwargs, private, per_sample)``, cached by ``key``."""
        from privml.backends.linmaps import linear_map

        hit = self._affine_cache.get(key)
        if hit is None:
            func, args, kwargs, private, per_sample = op
            hit = self._affine_cache[key] = linear_map(func, args, kwargs, private, sample_shape, per_sample)
        return hit

    def input_packing(self, shape: tuple[int, ...]) -> Packing:
        """How a freshly encrypted batch of ``shape`` is packed."""
        sample = tuple(shape[1:])
        if self.layout == "throughput":
            if shape[0] > self.width:
                raise InvalidInput(f"privml: batch of {shape[0]} exceeds the {self.width} slots per feature (lanes) "
                                   "of this throughput plan: split it into chunks, or compile with batch_size= at "
                                   "least the batch")
            return packings.for_shape(sample, self.slots, width=self.width)
        if self.expansion is not None:
            return packings.dense(int(self.expansion.index.size), self.slots)
        return packings.for_shape(sample, self.slots)

    def _encrypt_vector(self, v: np.ndarray) -> Any:
        """Secret-key encryption where the key is (the client): less noise than public-key encryption and about
        twice as fast (7 vs 12.5 ms at N=16384); a server warming up encrypts with the public key."""
        return self.ctx.encrypt_symmetric(v) if self.ctx.has_secret_key else self.ctx.encrypt(v)

    # ---- client side
    def encrypt(self, x: torch.Tensor) -> list:
        if x.dim() < 1 or x.shape[0] < 1 or x.numel() < 1:
            raise InvalidInput(f"privml: cannot encrypt an empty batch (shape {list(x.shape)}): the CKKS backend "
                               "needs at least one sample with at least one value")
        flat = x.detach().double().reshape(x.shape[0], -1).numpy()
        pk = self.input_packing(tuple(x.shape))
        if self.layout == "latency":
            if self.expansion is not None:
                flat = self.expansion.expand(flat)
                if flat.shape[1] > self.slots:
                    raise InvalidInput(f"privml: an expanded sample has {flat.shape[1]} values but a ciphertext "
                                       f"holds {self.slots}")
            cts = [self._encrypt_vector(v) for row in flat for v in pk.scatter(row, self.slots)]
            return ExpandedInput(cts) if self.expansion is not None else cts
        lanes = np.zeros((flat.shape[1], pk.width))
        lanes[:, : flat.shape[0]] = flat.T
        return [self._encrypt_vector(v) for v in pk.scatter(lanes, self.slots)]

    def decrypt(self, payload: list, batch: int, packing: Packing) -> np.ndarray:
        """(batch, n) values of a materialized payload packed as ``packing``."""
        _not_expanded(payload)
        vectors = [self.ctx.decrypt(ct) for ct in payload]
        k = packing.n_cts
        if self.layout == "latency":
            if len(vectors) != batch * k:
                raise MalformedInput(f"privml: {len(vectors)} ciphertexts for {batch} samples of {k} each")
            return np.stack([packing.gather(vectors[i * k:(i + 1) * k]) for i in range(batch)])
        if len(vectors) != k:
            raise MalformedInput(f"privml: {len(vectors)} ciphertexts where the packing has {k}")
        return packing.gather(vectors)[:, :batch].T

    def share_maps(self, other: Runtime) -> None:
        """Use ``other``'s caches of linear maps and block products (a runtime of the same plan): the products'
        keys then match the plaintexts a shared cache holds (:meth:`CKKSContext.share_plaintexts`)."""
        self._mixing, self._affine_cache, self._matvec_cache = other._mixing, other._affine_cache, other._matvec_cache

    # ---- spill: what folded products leave outside the units (Spilled)
    def value_limit(self, payload: Any) -> float:
        """The largest |value| a ciphertext of ``payload`` holds without overflowing its level (a quarter of it)."""
        return self._limit_at(self.levels_left(payload))

    def _limit_at(self, level: int) -> float:
        return 2.0 ** (self.ctx.chain.bits(level) - 3) / self.ctx.chain.scale_at(level) if level >= 0 else 0.0

    def folds(self, affine: Affine) -> bool:
        """Whether ``affine``'s single-ciphertext product may fold (the plan's bound is set, the map not excluded)."""
        return self.fold_bound is not None and map_name(affine) not in self.no_fold

    def _mark(self, payload: Any, spill: float, sources: frozenset[str] = frozenset()) -> Any:
        """``payload`` with its spill bound (``sources``: the folded maps it comes from); refuses an overflow."""
        if not spill:
            return payload
        limit = self.value_limit(payload)
        if not spill < limit:
            raise DepthExhausted(f"privml: values a folded linear map left outside its outputs could reach {spill:.3g} "
                                 f"here, over the {limit:.3g} this level holds: compile this model again (the "
                                 "planner then applies that map without folding)")
        out = payload if isinstance(payload, Spilled) else Spilled(payload)
        out.spill = float(spill)
        return out

    # ---- server side
    def matvec(self, affine: Affine, src: Packing, dst: Packing, expanded: bool = False,
               fold: bool | None = None) -> Any:
        """The (cached) block diagonal product of ``affine`` between two packings (``fold``: default the plan's)."""
        fold = self.folds(affine) if fold is None else fold
        key = (affine.key, src, dst, expanded, self.key_mode, fold)
        mv = self._matvec_cache.get(key)
        if mv is None:
            mv = self._matvec_cache[key] = build_matvec(affine, src, dst, self.slots,
                                                        self.expansion if expanded else None, self.key_mode,
                                                        fold=fold, rescale_first=self.rescale_first)
        return mv

    def apply_affine(self, payload: list, affine: Affine, src: Packing, out_shape: tuple[int, ...],
                     dst: Packing | None = None) -> tuple[list, Packing]:
        """``affine`` on a payload packed as ``src``; returns the result and its packing (``dst`` if given)."""
        from privml.he.kernels import dense_throughput

        dst = dst or packings.output_packing(src, out_shape, self.slots)
        if self.layout == "throughput" and src.per_ct == 1 and dst.per_ct == 1:
            return dense_throughput(self.ctx, payload, affine.weight, affine.bias), dst
        expanded = isinstance(payload, ExpandedInput)
        mv = self.matvec(affine, src, dst, expanded)
        if mv.fold_steps and not mv.fold_gain * self.fold_bound < self._limit_at(self.levels_left(payload) - 1):
            mv = self.matvec(affine, src, dst, expanded, fold=False)  # a model the plan was not made for
        if self.layout == "throughput":
            return mv.apply(self.ctx, list(payload)), dst
        k, out = src.n_cts, []
        for i in range(0, len(payload), k):
            out += mv.apply(self.ctx, list(payload[i:i + k]))
        if mv.fold_steps:
            out = self._mark(out, mv.fold_gain * self.fold_bound)
        return out, dst

    def poly(self, payload: list, coeffs: list[float], input_bound: float | None = None) -> list:
        """Evaluate the polynomial on every ciphertext (``input_bound``: max |input|, for keyless noise bounds)."""
        from privml.he.kernels import eval_poly

        _not_expanded(payload)
        degree = max((i for i, c in enumerate(coeffs) if c), default=0)
        out = [eval_poly(self.ctx, ct, coeffs) for ct in _progress(payload, f"poly deg {degree}")]
        return self._mark(out, spill_after_poly(coeffs, _spill(payload)), _sources(payload))

    def mul(self, a: list, b: list) -> list:
        _not_expanded(a, b)
        out = [self.ctx.mul(x, y) for x, y in zip(_progress(a, "multiply"), b, strict=True)]
        return self._mark(out, spill_after_product(_spill(a), _spill(b)), _sources(a, b))

    def square(self, a: list) -> list:
        _not_expanded(a)
        return self._mark([self.ctx.square(x) for x in _progress(a, "square")], _spill(a) * _spill(a), _sources(a))

    def add(self, a: list, b: list, negate_b: bool = False) -> list:
        _not_expanded(a, b)
        op = self.ctx.sub if negate_b else self.ctx.add
        return self._mark([op(x, y) for x, y in zip(a, b, strict=True)], _spill(a) + _spill(b), _sources(a, b))

    def levels_left(self, payload: list) -> int:
        return min(self.ctx.level(ct) for ct in payload)


class Level(int):
    """A dry run's payload: the levels a ciphertext used. One object per ciphertext result, as the real payloads
    are: the tensor tells "the same ciphertexts" from "others at the same level" by identity (``_binary``), and
    CPython shares the objects of small plain ints. ``spill`` as in :class:`Spilled`, ``spill_from``: the folded
    maps it comes from."""

    spill = 0.0
    spill_from: frozenset[str] = frozenset()


class DryRuntime(Runtime):
    """Same routing, no keys: the payload is the number of levels used so far (an int).

    Records the total depth, the rotation steps the block diagonal products need, the slots they
    need, and a log of which fused ops consumed which level.
    """

    def __init__(self, layout: str, slots: int = 1 << 14, key_mode: str = "direct", lanes: int | None = None,
                 split_before: frozenset[str] = frozenset(), fold_bound: float | None = None,
                 no_fold: frozenset[str] = frozenset()) -> None:
        super().__init__(None, layout, key_mode=key_mode, lanes=lanes, split_before=split_before,
                         fold_bound=fold_bound, no_fold=no_fold)
        self.spill_at: dict[int, tuple[float, frozenset[str]]] = {}  # levels used -> (largest spill bound there,
        # the folded maps it comes from): the planner checks them against its parameters
        self.folded: list[str] = []  # the maps whose products fold, in the order the model applies them
        self.mults = 0  # ciphertext-plaintext products per forward pass
        self.rotations_at: dict[int, int] = {}  # levels used -> rotations there (the planner's time prediction)
        self.mults_at: dict[int, int] = {}  # levels used -> ciphertext-plaintext products there
        self._slots = slots
        self.depth = 0
        self.rotation_steps: set[int] = set()
        self.min_slots = 1
        self.log: list[tuple[str, str, int, int]] = []  # (names, op, levels consumed, depth after)
        self.fresh_maps: set[tuple] = set()  # distinct affine maps applied directly to the fresh input
        self.first_weight: sp.csr_matrix | None = None
        self.plaintexts = 0  # encoded diagonals one forward pass caches
        self.plaintexts_at: dict[int, int] = {}  # levels used before the product -> plaintexts encoded there
        self.live_at: dict[int, int] = {}  # levels used -> most ciphertexts alive at once in a product there
        self.rotation_uses: dict[int, int] = {}  # rotation step -> rotations by it per forward pass

    @property
    def slots(self) -> int:
        return self._slots

    def _note(self, names: str, op: str, cost: int, after: int) -> Level:
        self.depth = max(self.depth, after)
        self.log.append((names, op, cost, after))
        return Level(after)

    def _mark(self, payload: Level, spill: float, sources: frozenset[str] = frozenset()) -> Level:
        """Record the bound at the levels ``payload`` used (the dry run has no chain yet)."""
        if spill:
            used = int(payload)
            bound, origin = self.spill_at.get(used, (0.0, frozenset()))
            self.spill_at[used] = (max(bound, spill), origin | sources)
            payload.spill, payload.spill_from = float(spill), sources
        return payload

    def encrypt(self, x: torch.Tensor) -> Level:
        self.min_slots = max(self.min_slots, max(x.shape[0], self.lanes or 1) if self.layout == "throughput" else
                             int(self.expansion.index.size) if self.expansion is not None else 1)
        self.batch = int(x.shape[0])
        return Level(0)

    def apply_affine(self, payload: int, affine: Affine, src: Packing, out_shape: tuple[int, ...],
                     dst: Packing | None = None) -> tuple[int, Packing]:
        dst = dst or packings.output_packing(src, out_shape, self.slots)
        if payload == 0:
            self.fresh_maps.add(affine.key)
            self.first_weight = affine.weight
        names = map_name(affine)
        times = self.batch if self.layout == "latency" else 1
        mv = None
        if not (self.layout == "throughput" and src.per_ct == 1 and dst.per_ct == 1):
            expanded = payload == 0 and self.expansion is not None
            mv = build_matvec(affine, src, dst, self.slots, self.expansion if expanded else None, self.key_mode,
                              fold=self.folds(affine))
            self.rotation_steps |= mv.rotation_steps()
            for step, count in mv.rotation_uses().items():
                self.rotation_uses[step] = self.rotation_uses.get(step, 0) + count * times
            self.plaintexts += mv.plaintext_count
            self.mults += int(mv.mult_count) * times
            self.mults_at[payload] = self.mults_at.get(payload, 0) + int(mv.mult_count) * times
            self.rotations_at[payload] = self.rotations_at.get(payload, 0) + int(mv.rotation_count) * times
            self.plaintexts_at[payload] = self.plaintexts_at.get(payload, 0) + mv.plaintext_count
            live = (mv.baby_count + mv.n_in_cts + mv.n_out_cts) * times
            self.live_at[payload] = max(self.live_at.get(payload, 0), live)
        else:  # one feature per ciphertext: every input and output ciphertext of the layer at once
            self.live_at[payload] = max(self.live_at.get(payload, 0), src.n_cts + dst.n_cts)
            self.mults += int(affine.weight.nnz)
            self.mults_at[payload] = self.mults_at.get(payload, 0) + int(affine.weight.nnz)
        self.live_at[payload + 1] = max(self.live_at.get(payload + 1, 0), 2 * dst.n_cts * times)  # out + activation
        out = self._note(names, "linear", 1, payload + 1)
        if getattr(mv, "fold_steps", None):
            self.folded.append(names)
            out = self._mark(out, mv.fold_gain * self.fold_bound, frozenset({names}))
        return out, dst

    def poly(self, payload: int, coeffs: list[float], input_bound: float | None = None) -> int:
        from privml.he.kernels import poly_depth

        if payload == 0:
            self.fresh_maps.add(("non-affine",))
        degree = max((i for i, c in enumerate(coeffs) if c != 0.0), default=0)
        cost = poly_depth(degree)
        out = self._note(current_module() or "", f"poly(deg {degree})", cost, payload + cost)
        return self._mark(out, spill_after_poly(coeffs, _spill(payload)), _sources(payload))

    def mul(self, a: int, b: int) -> int:
        if 0 in (a, b):
            self.fresh_maps.add(("non-affine",))
        out = self._note(current_module() or "", "mul", 1, max(a, b) + 1)
        return self._mark(out, spill_after_product(_spill(a), _spill(b)), _sources(a, b))

    def square(self, a: int) -> int:
        if a == 0:
            self.fresh_maps.add(("non-affine",))
        return self._mark(self._note(current_module() or "", "square", 1, a + 1), _spill(a) * _spill(a), _sources(a))

    def add(self, a: int, b: int, negate_b: bool = False) -> Level:
        if 0 in (a, b):
            self.fresh_maps.add(("non-affine",))
        return self._mark(Level(max(a, b)), _spill(a) + _spill(b), _sources(a, b))

    def levels_left(self, payload: int) -> int:
        return 10**6


# --------------------------------------------------------------------------------------------- the tensor
class CKKSTensor(PrivateTensor):
    """A batch of CKKS-encrypted samples; ``pending`` is a fused affine map not yet applied, ``packing`` says
    where the payload's values live (the input of ``pending`` when one is set)."""

    backend_name = "ckks"
    metadata_fields = ("runtime", "pending", "packing")

    @property
    def layout(self) -> str:
        return self.runtime.layout

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        pending = "none" if self.pending is None else "+".join(dict.fromkeys(self.pending.names))
        return f"{type(self).__name__}(shape={list(self.shape)}, layout={self.runtime.layout}, pending={pending})"

    def materialized(self) -> CKKSTensor:
        """The same value with any pending affine map applied (one level)."""
        if self.pending is None:
            return self
        payload, packing = self.runtime.apply_affine(self.payload, self.pending, self.packing, tuple(self.shape[1:]))
        return type(self)(payload, self.shape, self.dtype, runtime=self.runtime, pending=None, packing=packing)

    def repacked(self, packing: Packing) -> CKKSTensor:
        """The same value packed as ``packing`` (one level: an identity map between the packings)."""
        x = self.materialized()
        if x.packing == packing:
            return x
        n = x.packing.n
        ident = Affine(sp.identity(n, format="csr"), np.zeros(n), (("repack", x.packing, packing),), ("repack",))
        payload, packing = x.runtime.apply_affine(x.payload, ident, x.packing, tuple(x.shape[1:]), packing)
        return type(x)(payload, x.shape, x.dtype, runtime=x.runtime, pending=None, packing=packing)

    def finalize(self) -> CKKSTensor:
        return self.materialized()

    def with_payload(self, payload: Any, shape: tuple[int, ...] | None = None) -> CKKSTensor:
        return type(self)(payload, shape if shape is not None else self.shape, self.dtype, runtime=self.runtime,
                          pending=None, packing=self.packing)


def _private(args: tuple, kwargs: dict) -> list[CKKSTensor]:
    found = [a for a in list(args) + list(kwargs.values()) if isinstance(a, CKKSTensor)]
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            found += [x for x in a if isinstance(x, CKKSTensor)]
    return found


def _check_plain_operands(x: CKKSTensor, func: object, args: tuple, kwargs: dict, elementwise: bool) -> None:
    """Plain operands must be finite; in elementwise ops they must be the same for every sample."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and not isinstance(a, PrivateTensor):
            if elementwise and a.dim() >= x.dim() and a.shape[0] != 1:
                raise unsupported(CKKSTensor, func, args, kwargs, "a plain operand that differs across the batch "
                                  "cannot be fused into the encrypted linear map; use the same operand for all "
                                  "samples (batch dimension 1).")
            if not torch.isfinite(a).all():
                raise InvalidInput(f"privml: a plain operand of {op_name(func)} contains NaN or inf")
    spec = REGISTRY.for_function(func)
    divisor = args[1] if spec is not None and spec.name == "div" and len(args) > 1 else None
    if isinstance(divisor, (int, float, torch.Tensor)) and not isinstance(divisor, PrivateTensor):
        if bool((torch.as_tensor(divisor) == 0).any()):
            raise InvalidInput(f"privml: {op_name(func)} divides an encrypted tensor by zero")


_ELEMENTWISE = ("add", "sub", "mul", "div")


def _affine(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    """An op that is affine in its single private operand: fused into ``pending`` (no ciphertext work)."""
    privates = _private(args, kwargs)
    if len(privates) != 1:
        raise unsupported(CKKSTensor, func, args, kwargs, "expected exactly one encrypted operand here.")
    x = privates[0]
    spec = REGISTRY.for_function(func)
    _check_plain_operands(x, func, args, kwargs, spec is not None and spec.name in _ELEMENTWISE)
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    target = out_of_place(func)

    def per_sample(z: torch.Tensor) -> torch.Tensor:
        def swap(a: object) -> object:
            if a is x:
                return z
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                return a.detach().double()
            return a

        with torch._C.DisableTorchFunctionSubclass():
            return target(*tree_map(swap, args), **tree_map(swap, kwargs))

    sample_shape = tuple(x.shape[1:])
    key = (op_name(func), _arg_key(args), _arg_key(kwargs), sample_shape)
    w, b, out_shape = x.runtime.affine_of(key, (func, args, kwargs, x, per_sample), sample_shape)
    step = Affine(w, b, (key,), (current_module() or op_name(func),))
    if not x.runtime.fuses(x.pending, step):
        x = x.materialized()
    pending = step if x.pending is None else x.pending.then(step)
    return type(x)(x.payload, (x.shape[0], *out_shape), x.dtype, runtime=x.runtime, pending=pending,
                   packing=x.packing)


CKKSTensor.implements("linear", "conv2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm", "sum", "mean",
                      "neg", "div")(_affine)


@CKKSTensor.implements("flatten", "reshape")
def _reshape(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    """flatten/reshape/view: only the logical shape changes (row-major flat layout is kept); batch stays first."""
    x, rest = args[0], args[1:]
    with torch._C.DisableTorchFunctionSubclass():
        probe = func(torch.empty(x.shape, device="meta"), *rest, **kwargs)
    if probe.shape[0] != x.shape[0] or probe.numel() != x.numel():
        raise unsupported(CKKSTensor, func, args, kwargs, "reshapes must keep the batch dimension first.")
    return type(x)(x.payload, tuple(probe.shape), x.dtype, runtime=x.runtime, pending=x.pending, packing=x.packing)


@CKKSTensor.implements("identity", "dropout", "stochastic_depth")
def _identity(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    return args[0] if args else kwargs["input"]


@CKKSTensor.implements_aten([aten.detach.default, aten.alias.default])
def _aten_identity(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    return args[0]


@CKKSTensor.implements("add", "sub", "mul")
def _binary(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    """add/sub/mul: fused when one side is plain, ciphertext arithmetic when both are encrypted."""
    privates = _private(args, kwargs)
    if len(privates) < 2:
        return _affine(func, types, args, kwargs)
    combine = REGISTRY.for_function(func).name
    a, b = args[0], args[1]
    if kwargs.get("alpha", 1) != 1:
        raise unsupported(CKKSTensor, func, args, kwargs, "alpha != 1 with two encrypted operands.")
    if combine != "mul" and a.payload is b.payload and a.shape[0] == b.shape[0]:
        return _combine_same_base(a, b, -1.0 if combine == "sub" else 1.0)
    if a.shape != b.shape:
        raise unsupported(CKKSTensor, func, args, kwargs, f"encrypted operands must have the same shape "
                          f"(got {list(a.shape)} and {list(b.shape)}); broadcasting is not supported.")
    if a.runtime is not b.runtime:
        raise InvalidInput("privml: the two encrypted operands come from different sessions/contexts")
    same = a is b
    a = a.materialized()
    b = a if same else b.materialized()
    if b.packing != a.packing:  # e.g. a residual branch laid out differently from its shortcut
        b = b.repacked(a.packing)
    rt = a.runtime
    if combine == "mul":
        payload = rt.square(a.payload) if same else rt.mul(a.payload, b.payload)
    else:
        payload = rt.add(a.payload, b.payload, negate_b=combine == "sub")
    return a.with_payload(payload)


def _as_affine(x: CKKSTensor) -> tuple[sp.csr_matrix, np.ndarray, tuple, tuple]:
    """x's pending map as (W, b, key, names), the identity when nothing is pending."""
    if x.pending is not None:
        return x.pending.weight, x.pending.bias, x.pending.key, x.pending.names
    n = int(np.prod(x.shape[1:]))
    return sp.identity(n, format="csr"), np.zeros(n), (), ()


def _broadcast_rows(shape: tuple[int, ...], out: tuple[int, ...]) -> np.ndarray:
    """For each flat index of ``out``, the flat index of ``shape`` that broadcasting reads."""
    idx = np.arange(int(np.prod(shape)) if shape else 1).reshape(shape)
    return np.broadcast_to(idx, out).reshape(-1)


def _combine_same_base(a: CKKSTensor, b: CKKSTensor, sign: float) -> CKKSTensor:
    """a + sign*b where both are affine maps of the SAME ciphertexts: no ciphertext work at all, with broadcasting
    (e.g. a residual branch added to its own input, or x.sum(...) + x.mean(...))."""
    wa, ba, ka, na = _as_affine(a)
    wb, bb, kb, nb = _as_affine(b)
    sa, sb = tuple(a.shape[1:]), tuple(b.shape[1:])
    out = tuple(torch.broadcast_shapes(sa, sb))
    ra, rb = _broadcast_rows(sa, out), _broadcast_rows(sb, out)
    w = sp.csr_matrix(wa[ra] + sign * wb[rb])
    bias = ba[ra] + sign * bb[rb]
    pending = Affine(w, bias, (("combine", sign, ka, kb),), na + nb)
    return type(a)(a.payload, (a.shape[0], *out), a.dtype, runtime=a.runtime, pending=pending, packing=a.packing)


@CKKSTensor.implements("matmul")
def _matmul(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    """(encrypted batch) @ (plain matrix); the registry's check refuses the other forms."""
    return _affine(func, types, args, kwargs)


def _square_of(x: CKKSTensor) -> CKKSTensor:
    x = x.materialized()
    return x.with_payload(x.runtime.square(x.payload))


@CKKSTensor.implements("square")
def _square(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    return _square_of(args[0])


@CKKSTensor.implements("pow")
def _pow(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    x, exponent = args[0], int(args[1])
    if exponent == 1:
        return x
    if exponent == 2:
        return _square_of(x)
    return _poly_of(x, [0.0] * exponent + [1.0])


def _poly_of(x: CKKSTensor, coeffs: object, domain: tuple[float, float] | None = None) -> CKKSTensor:
    """Polynomial activation. With a ``domain``, the x -> t map is fused into a pending linear map (free);
    without a pending map it is folded into the coefficients instead (no extra level either)."""
    from privml.approx.basis import square_form
    from privml.functional import coeffs_in_x, to_unit_interval

    c = [float(v) for v in (coeffs.tolist() if isinstance(coeffs, torch.Tensor) else coeffs)]
    if not np.all(np.isfinite(c)):
        raise InvalidInput("privml: polynomial coefficients contain NaN or inf")
    bound = None
    if domain is not None and x.pending is not None:
        alpha, beta = to_unit_interval(domain)
        square = square_form(c)
        if square is not None:  # one level instead of two: the map to u is fused into the pending linear map
            s, shift, sign, const = square
            u = _affine(torch.add, (), (_affine(torch.mul, (), (x, alpha * s), {}), beta * s + shift), {})
            y = _square_of(u)
            if sign < 0:
                y = _affine(torch.neg, (), (y,), {})
            return _affine(torch.add, (), (y, const), {}) if const else y  # fused into the next linear map
        x = _affine(torch.add, (), (_affine(torch.mul, (), (x, alpha), {}), beta), {})
        bound = 1.0  # the polynomial now runs on t in [-1, 1]
    elif domain is not None:
        c = coeffs_in_x(c, domain).tolist()
        bound = max(abs(float(domain[0])), abs(float(domain[1])))
    x = x.materialized()
    return x.with_payload(x.runtime.poly(x.payload, c, input_bound=bound))


@CKKSTensor.implements("polyval")
def _polyval(func: object, types: tuple, args: tuple, kwargs: dict) -> CKKSTensor:
    return _poly_of(*args, **kwargs)


# --------------------------------------------------------------------------------------------- serialization
_TENSOR_MAGIC = b"PRIVMLCT"
_TENSOR_VERSION = 1


def dumps(t: CKKSTensor) -> bytes:
    """Serialize an encrypted tensor: a small versioned header (shape, layout) plus its ciphertexts."""
    from privml.he.serialize import dump_ciphertexts

    t = t.materialized()
    header = json.dumps({"shape": list(t.shape), "layout": t.layout,
                         "expanded": isinstance(t.payload, ExpandedInput), "packing": t.packing.to_dict()}).encode()
    body = dump_ciphertexts(t.runtime.ctx, list(t.payload))
    data = _TENSOR_MAGIC + struct.pack("<HI", _TENSOR_VERSION, len(header)) + header + body
    return data + _digest(data)


def _digest(data: bytes) -> bytes:
    """Checksum over header and body, so an edited header (e.g. a shape) cannot pass with intact ciphertexts."""
    return hashlib.blake2b(data, digest_size=32, person=b"privml-ct-v1").digest()


_MAX_DIMS = 8
_MAX_DIM = 1 << 24


def _parse_header(raw: bytes) -> tuple[tuple[int, ...], str, bool, Packing]:
    """(shape, layout, expanded, packing) of a tensor header; MalformedInput for anything but the exact types."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nesting deeper than the parser allows
        raise MalformedInput("privml: corrupt encrypted tensor header (not JSON)") from None
    if not isinstance(header, dict) or set(header) != {"shape", "layout", "expanded", "packing"}:
        raise MalformedInput("privml: corrupt encrypted tensor header (unexpected structure or fields)")
    shape, layout, expanded = header.get("shape"), header.get("layout"), header.get("expanded", False)
    if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_DIMS
            or any(type(s) is not int or not 1 <= s <= _MAX_DIM for s in shape)):
        raise MalformedInput(f"privml: corrupt encrypted tensor header: bad shape {str(shape)[:80]}")
    if not isinstance(layout, str) or layout not in LAYOUTS or not isinstance(expanded, bool):
        raise MalformedInput("privml: corrupt encrypted tensor header: bad layout or expansion flag")
    if math.prod(shape) > 1 << 40:
        raise MalformedInput(f"privml: implausible tensor shape {shape}")
    raw_pk = header["packing"]
    if (not isinstance(raw_pk, dict) or set(raw_pk) != {"kind", "n", "width", "per_ct", "grid"}
            or not all(type(v) is int for k, v in raw_pk.items() if k not in ("kind", "grid"))
            or not isinstance(raw_pk["grid"], list) or not all(type(v) is int for v in raw_pk["grid"])
            or len(raw_pk["grid"]) not in (0, 6) or any(not 0 < v <= _MAX_DIM for v in raw_pk["grid"])):
        raise MalformedInput("privml: corrupt encrypted tensor header: bad packing")
    try:
        packing = Packing.from_dict(raw_pk)
    except PrivmlError:
        raise MalformedInput("privml: corrupt encrypted tensor header: bad packing") from None
    return tuple(shape), layout, expanded, packing


def loads(data: bytes, runtime: Runtime, cls: type[CKKSTensor] | None = None) -> CKKSTensor:
    """Inverse of ``dumps`` under ``runtime``'s context; foreign or tampered bytes raise privml errors."""
    from privml.he.serialize import load_ciphertexts

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedInput(f"privml: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 14 + 32 or data[:8] != _TENSOR_MAGIC:
        raise MalformedInput("privml: not a privml encrypted tensor (bad magic or truncated)")
    data, digest = data[:-32], data[-32:]
    if not hmac.compare_digest(_digest(data), digest):
        raise MalformedInput("privml: encrypted tensor bytes fail their checksum (truncated or modified)")
    version, hlen = struct.unpack("<HI", data[8:14])
    if version != _TENSOR_VERSION:
        raise MalformedInput(f"privml: encrypted tensor format version {version}, expected {_TENSOR_VERSION}")
    if hlen > 4096 or 14 + hlen > len(data):
        raise MalformedInput("privml: truncated or corrupt encrypted tensor header")
    shape, layout, expanded, packing = _parse_header(data[14:14 + hlen])
    if layout != runtime.layout:
        raise MalformedInput(f"privml: tensor layout {layout} does not fit this session ({runtime.layout})")
    if expanded and runtime.expansion is None:
        raise MalformedInput("privml: the tensor claims an expanded first-layer input, which this plan does not use")
    numel = math.prod(shape[1:])
    if (packing.per_ct * packing.width > runtime.slots or packing.n != (packing.n if expanded else numel)
            or (layout == "throughput") != (packing.width > 1) or (layout == "throughput" and shape[0] > packing.width)
            or (layout == "throughput" and packing.width != runtime.width)
            or packing.n_units > 1 << 30):
        raise MalformedInput(f"privml: the tensor's packing {packing.to_dict()} does not fit its shape "
                             f"{list(shape)} and this context's {runtime.slots} slots")
    cts = load_ciphertexts(runtime.ctx, data[14 + hlen:])
    expected = packing.n_cts * (shape[0] if layout == "latency" else 1)
    if len(cts) != expected:
        raise MalformedInput(f"privml: header promises {expected} ciphertexts, got {len(cts)}")
    if runtime.expansion is not None and expanded:
        cts = ExpandedInput(cts)
    return (cls or CKKSTensor)(cts, shape, torch.float32, runtime=runtime, pending=None, packing=packing)


# --------------------------------------------------------------------------------------------- backend objects
def _params_of(plan: Any) -> tuple[Any, list[int], str]:
    from privml.he.params import CKKSParams

    ck = plan.params.get("ckks")
    if not ck:
        raise PrivmlError("privml: this plan has no CKKS parameters; compile the model with backend='ckks'")
    return CKKSParams.from_dict(ck), list(plan.params.get("rotation_steps", [])), plan.params.get("layout", "latency")


def _expansion_of(plan: Any) -> Any:
    from privml.he.expansion import InputExpansion

    d = plan.params.get("input_expansion")
    return InputExpansion.from_dict(d) if d else None


class CKKSBackend:
    """Client side: owns the secret key; encrypts, decrypts, exports the public evaluation context."""

    name = "ckks"

    def __init__(self, plan: Any, context: Any = None) -> None:
        from privml.he.context import CKKSContext

        params, steps, layout = _params_of(plan)
        self.plan = plan
        if context is not None:  # keys saved by an earlier session (Session.from_keys)
            missing = sorted({s % params.slots for s in steps} - {s % params.slots for s in context.rotation_steps}
                             - {0})
            if context.params != params or not context.has_secret_key or missing:
                raise KeyMaterialError("privml: the saved keys were made for another plan (" + (
                    "no secret key" if not context.has_secret_key else "other CKKS parameters"
                    if context.params != params else f"no Galois keys for rotations {missing[:8]}") + ")")
        self.ctx = context if context is not None else CKKSContext.generate(params, steps)
        self.ctx.cache_bytes = PLAINTEXT_CACHE_BYTES
        self.runtime = runtime_for(plan, self.ctx)
        self.sent_batches: set[int] = set()  # batch sizes this client encrypted: a result must have one of them

    def encrypt(self, x: torch.Tensor) -> CKKSTensor:
        payload = self.runtime.encrypt(x)
        self.sent_batches.add(int(x.shape[0]))
        return CKKSTensor(payload, tuple(x.shape), torch.float32, runtime=self.runtime, pending=None,
                          packing=self.runtime.input_packing(tuple(x.shape)))

    def check_ours(self, t: CKKSTensor) -> None:
        """KeyMaterialError unless ``t`` was made under this backend's keys; MalformedInput unless its batch size
        is one this client encrypted (ops never change the batch, so a response with more rows is forged)."""
        ctx = getattr(t.runtime, "ctx", None)
        fingerprint = getattr(ctx, "fingerprint", None)
        if fingerprint != self.ctx.fingerprint:
            raise KeyMaterialError("privml: this encrypted tensor was produced under another key set (context "
                                   "fingerprint mismatch): decrypt it with the session that encrypted its input")
        if t.shape[0] not in self.sent_batches:
            raise MalformedInput(f"privml: the encrypted result has a batch of {t.shape[0]} samples but this session "
                                 f"only encrypted batches of {sorted(self.sent_batches)}: the response is forged or "
                                 "belongs to another client")

    def decrypt(self, t: CKKSTensor) -> torch.Tensor:
        self.check_ours(t)
        t = t.materialized()
        values = self.runtime.decrypt(t.payload, t.shape[0], t.packing)
        out = torch.from_numpy(values).float().reshape(t.shape)
        if not torch.isfinite(out).all():  # e.g. coefficients rewritten in transit (the checksum is not a MAC)
            raise MalformedInput("privml: decrypted values are not finite: the ciphertexts were corrupted")
        return out

    def levels_used(self, t: CKKSTensor) -> int:
        """Levels a (materialized) result consumed since encryption."""
        return self.ctx.max_level - self.runtime.levels_left(t.materialized().payload)

    # ---- client/server split
    def public_context(self) -> bytes:
        """The evaluation context a server needs: public, relinearization and the plan's Galois keys only."""
        from privml.he.serialize import dump_context

        return dump_context(self.ctx, include_secret=False)

    def public_context_bytes(self) -> int:
        """Size of :meth:`public_context` (serialized once: the keys do not change within a session)."""
        if getattr(self, "_context_bytes", None) is None:
            self._context_bytes = len(self.public_context())
        return self._context_bytes

    def dumps(self, t: CKKSTensor) -> bytes:
        return dumps(t)

    def loads(self, data: bytes) -> CKKSTensor:
        return loads(data, self.runtime)

    def costs(self) -> dict[str, Any]:
        p = self.ctx.params
        return {"ring dimension N": p.poly_modulus_degree, "modulus chain (bits)": list(p.coeff_mod_bit_sizes),
                "scale bits": p.scale_bits, "security": f"{p.security_bits}-bit (HE standard)",
                "galois keys (rotation steps)": len(self.ctx.rotation_steps),
                "public context bytes": self.public_context_bytes(), **{f"ops: {k}": v for k, v in
                                                                      self.ctx.stats.items()}}

    def visibility(self) -> list[dict[str, str]]:
        """Who saw what, one row per role (in a ``privml.Session`` one process plays both; deployed, they differ)."""
        return [
            {"role": "client", "input": "plaintext (its own)", "weights": "no", "output": "plaintext (decrypted)",
             "keys": "secret key + public evaluation context", "also sees": "the plan (calibrated ranges, shapes)"},
            {"role": "server", "input": "ciphertexts only", "weights": "plaintext (its own)",
             "output": "ciphertexts only", "keys": "public evaluation context (no secret key)",
             "also sees": "shapes, packing layout, timing"},
        ]

    def attacker_model(self) -> str:
        return ("honest-but-curious server: it follows the protocol and learns nothing from ciphertexts (RLWE, "
                f"{self.ctx.params.security_bits}-bit HE-standard parameters); it must never see decryptions "
                "(IND-CPA-D). Not covered: a malicious server returning wrong results (no verifiable computation), "
                "and the model's architecture and timing, which the server knows.")

    def trust_statement(self) -> list[str]:
        return [
            "client: holds the CKKS secret key; sees its inputs and the decrypted logits only.",
            "server: holds the model weights in clear and a public evaluation context (no secret key); sees only "
            "ciphertexts, their shapes and the layout.",
            "leakage: input/output shapes, the model architecture (server side) and timing. CKKS decryptions are "
            "returned only to the client (IND-CPA-D: do not show decrypted values to the server).",
        ]


class CKKSServer:
    """Server side: evaluates a compiled model on ciphertexts with a public context (no secret key)."""

    def __init__(self, plan: Any, public_context: bytes, like: CKKSServer | None = None) -> None:
        """``like``: a server of the same plan (another client's keys) whose linear maps and encoded diagonals
        this one shares: they depend on the plan and the parameters only, never on keys."""
        from privml.he.serialize import load_context

        params, _, layout = _params_of(plan)
        self.plan = plan
        self.ctx = load_context(public_context)
        if self.ctx.params != params:
            raise InvalidInput("privml: the public context's parameters differ from the plan's")
        if self.ctx.has_secret_key:
            from privml.errors import KeyMaterialError

            raise KeyMaterialError("privml: the context given to the server contains a secret key; send "
                                   "session.public_context() instead")
        self.ctx.cache_bytes = PLAINTEXT_CACHE_BYTES
        self.runtime = runtime_for(plan, self.ctx)
        if like is not None:
            if like.plan.to_json() != plan.to_json():
                raise InvalidInput("privml: a server shares its encoded weights only with servers of the same plan")
            self.ctx.share_plaintexts(like.ctx)
            self.runtime.share_maps(like.runtime)

    def warm(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
        """Encode ``model``'s weight diagonals now, by running it once on an encryption of zeros (the public key
        encrypts), so that the first real request does not pay for them."""
        shape = (1, *input_shape)
        x = CKKSTensor(self.runtime.encrypt(torch.zeros(shape)), shape, torch.float32, runtime=self.runtime,
                       pending=None, packing=self.runtime.input_packing(shape))
        model(x)
        self.ctx.reset_stats()

    def run(self, model: torch.nn.Module, request: bytes) -> bytes:
        """Decode ciphertexts, run ``model`` on them, return the encrypted result as bytes."""
        x = loads(request, self.runtime)
        try:
            y = model(x)
        except PrivmlError:
            raise
        except (ValueError, RuntimeError) as exc:  # SEAL refusing a ciphertext that passed every load-time check
            raise MalformedInput(f"privml: evaluating the request failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(y, CKKSTensor):
            raise PrivmlError("privml: the model did not return an encrypted tensor")
        return dumps(y)


def make_backend(plan: Any, context: Any = None, **_: Any) -> CKKSBackend:
    """Backend factory used by ``privml.Session`` (``context``: saved keys to use instead of fresh ones)."""
    return CKKSBackend(plan, context)


def runtime_for(plan: Any, ctx: Any) -> Runtime:
    """The runtime a plan's CKKS parameters, layout and routing choices describe (client, server and workers)."""
    p = plan.params
    return Runtime(ctx, p.get("layout", "latency"), _expansion_of(plan), key_mode=p.get("key_mode", "direct"),
                   lanes=p.get("lanes"), split_before=split_before_of(plan), fold_bound=p.get("fold_bound"),
                   no_fold=names_of(plan, "no_fold"), rescale_first=p.get("rescale_first", False))


def names_of(plan: Any, key: str) -> frozenset[str]:
    """A plan field holding op names (``split_before``, ``no_fold``), validated."""
    names = plan.params.get(key, [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise MalformedInput(f"privml: the plan's {key} must be a list of op names, got {names!r}")
    return frozenset(names)


def split_before_of(plan: Any) -> frozenset[str]:
    """The ops the plan applies on their own instead of fusing them into the pending linear map."""
    return names_of(plan, "split_before")


def dry_run(model: torch.nn.Module, input_shape: tuple[int, ...], layout: str, batch: int = 1,
            input_expansion: bool = True, slots: int = 1 << 14, expansion: Any = None,
            lanes: int | None = None, key_mode: str = "direct", split_before: frozenset[str] = frozenset(),
            fold_bound: float | None = None, no_fold: frozenset[str] = frozenset()) -> DryRuntime:
    """Route ``model`` without keys to learn its exact depth, rotation steps and slot needs at ``slots``.

    With ``input_expansion`` the first linear layer may run on a client-side expansion of the input
    (:mod:`privml.he.expansion`); the model is then routed a second time with it."""
    rt = DryRuntime(layout, slots=slots, lanes=lanes, key_mode=key_mode, split_before=split_before,
                    fold_bound=fold_bound, no_fold=no_fold)
    rt.expansion = expansion
    shape = (batch, *input_shape)
    x = CKKSTensor(rt.encrypt(torch.empty(shape)), shape, torch.float32, runtime=rt, pending=None,
                   packing=rt.input_packing(shape))
    out = model(x)
    if not isinstance(out, CKKSTensor):
        raise PrivmlError("privml: the model's output is not an encrypted tensor")
    out.finalize()
    first = rt.first_weight
    if (expansion is None and input_expansion and layout == "latency" and len(rt.fresh_maps) == 1
            and first is not None and first.shape[0] * first.shape[1] <= 1 << 22):
        from privml.he.expansion import plan_expansion

        found = plan_expansion(first.toarray(), slots=rt.slots)
        if found is not None:
            return dry_run(model, input_shape, layout, batch, slots=slots, expansion=found, lanes=lanes,
                           key_mode=key_mode, split_before=split_before, fold_bound=fold_bound, no_fold=no_fold)
    return rt
