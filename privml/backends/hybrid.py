"""The ``hybrid`` backend: CKKS on an untrusted server, an attested enclave refreshing ciphertexts.

CKKS here has no bootstrapping, so deep models used to need huge rings (LeNet-5: N=32768) or were refused.
In hybrid mode the server still does all the bulk work on ciphertexts (the ``ckks`` backend's op table and
kernels, inherited by :class:`HybridTensor`), but when a ciphertext runs out of levels it is *refreshed* by
the enclave (:mod:`privml.enclave`, its own process) that holds the secret key:

* **pure refresh** (``mode="refresh"``): the server adds a uniform mask ``m`` (|m| <= 2^mask_bits x the
  plan's value bound) to every slot, the enclave decrypts ``x + m``, floods it (:mod:`privml.he.noise`) and
  re-encrypts it at the top level, the server subtracts ``m``. The enclave sees ``x + m`` only.
* **exact ReLU** (``mode="relu"``, when the plan says so): the server multiplies every slot by a positive
  random ``r`` in [1, 2^relu_mask_bits], the enclave returns ``Enc(relu(r x) + flood)`` at the top level
  and the server multiplies by ``1/r`` (ReLU is positively homogeneous). The enclave learns each value's
  sign (the ReLU's own on/off pattern) and its magnitude within the mask's factor; nothing else.

Levels: data lives on levels ``floor`` (= 1) .. top; level 0 (one 60-bit prime) is never used, so a
ciphertext at the floor still has 60 bits of headroom above the scale for the masked values. An op that
needs ``k`` levels runs after a refresh when fewer than ``k`` are left. The keyless
:class:`HybridDryRuntime` routes the model the same way to count refreshes and to bound the noise of every
refreshed ciphertext (the flooding is sized from the worst of them).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from privml.backends.ckks import (
    LAYOUTS,
    PLAINTEXT_CACHE_BYTES,
    Affine,
    CKKSTensor,
    Runtime,
    build_matvec,
    dumps,
    loads,
    split_before_of,
)
from privml.errors import DecryptionBudgetExhausted, InvalidInput, KeyMaterialError, MalformedInput, PrivmlError
from privml.he.noise import secure_normal, secure_uniform
from privml.tensor import current_module

COMPOSED_ROTATIONS = 8  # key switches one rotation may take when composed from power-of-two keys (worst case)
FLOOR = 1  # lowest level data may reach (level 0 stays unused: headroom for masks)
MODES = ("refresh", "relu")
CHUNK = 512  # ciphertexts per refresh message


@dataclass
class RefreshStats:
    """What the refreshes of one runtime cost: requests, ciphertexts, seconds and bytes on the wire."""

    requests: int = 0
    ciphertexts: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (module, mode, ciphertexts)
    budget_left: int | None = None


class Refresher:
    """The server's side of a refresh: blind, send to the enclave, unblind (no secret key here)."""

    def __init__(self, ctx: Any, enclave: Any, key_id: str, token: bytes, value_bound: float, mask_bits: int,
                 relu_mask_bits: int) -> None:
        self.ctx = ctx
        self.enclave = enclave
        self.key_id = key_id
        self.token = token
        self.mask = float(value_bound) * 2.0 ** mask_bits
        self.relu_range = 2.0 ** relu_mask_bits
        self.stats = RefreshStats()

    def _chunk(self) -> int:
        """Ciphertexts per message: at most CHUNK, and the answer (fresh, top level) well within a frame."""
        from privml.enclave.protocol import MAX_BODY

        top_bytes = 2 * self.ctx.params.poly_modulus_degree * 8 * (self.ctx.max_level + 1) + 4096
        return max(1, min(CHUNK, int(MAX_BODY / 1.25 / top_bytes)))

    def _call(self, cts: list, mode: str) -> list:
        chunk = self._chunk()
        if len(cts) > chunk:  # the enclave takes a bounded number of ciphertexts per message
            return [ct for i in range(0, len(cts), chunk) for ct in self._call(cts[i:i + chunk], mode)]
        from privml.he.serialize import dump_ciphertexts, load_ciphertexts

        if not cts:
            return []
        t0 = time.perf_counter()
        blob = dump_ciphertexts(self.ctx, list(cts))
        out, left = self.enclave.refresh(self.key_id, self.token, mode, blob, len(cts))
        fresh = load_ciphertexts(self.ctx, out)
        if len(fresh) != len(cts):
            raise MalformedInput(f"privml: the enclave returned {len(fresh)} ciphertexts for {len(cts)} sent")
        top = self.ctx.max_level
        if any(self.ctx.level(ct) != top for ct in fresh):
            raise MalformedInput("privml: the enclave returned ciphertexts below the top level")
        s = self.stats
        s.requests += 1
        s.ciphertexts += len(cts)
        s.seconds += time.perf_counter() - t0
        s.bytes_sent += len(blob)
        s.bytes_received += len(out)
        s.budget_left = int(left)
        s.log.append((current_module() or "", mode, len(cts)))
        return fresh

    def refresh(self, cts: list) -> list:
        """Fresh top-level encryptions of the same values (additive blinding)."""
        slots = self.ctx.slots
        masks = [secure_uniform(slots, -self.mask, self.mask) for _ in cts]  # OS CSPRNG, fresh per ciphertext
        blinded = [self.ctx.add_plain(ct, m) for ct, m in zip(cts, masks, strict=True)]
        fresh = self._call(blinded, "refresh")
        return [self.ctx.add_plain(ct, -m) for ct, m in zip(fresh, masks, strict=True)]

    def relu(self, cts: list) -> list:
        """relu(x) at the top level minus one: positive masks, the enclave's exact ReLU, unmasking."""
        slots = self.ctx.slots
        masks = [np.exp(secure_uniform(slots, 0.0, math.log(self.relu_range))) if self.relu_range > 1
                 else np.ones(slots) for _ in cts]
        masked = [self.ctx.mul_plain(ct, r) for ct, r in zip(cts, masks, strict=True)]
        fresh = self._call(masked, "relu")
        return [self.ctx.mul_plain(ct, 1.0 / r) for ct, r in zip(fresh, masks, strict=True)]


class HybridRuntime(Runtime):
    """The CKKS runtime plus refreshes: an op needing ``k`` levels first refreshes operands with fewer left."""

    def __init__(self, ctx: Any, layout: str, refresher: Refresher | None, floor: int = FLOOR,
                 split_before: frozenset[str] = frozenset()) -> None:
        super().__init__(ctx, layout, None, split_before=split_before)
        self.refresher = refresher
        self.floor = floor

    def _refresher(self) -> Refresher:
        if self.refresher is None:
            raise PrivmlError("privml: this hybrid runtime has no enclave connection, so it cannot refresh")
        return self.refresher

    def fit(self, payload: list, k: int) -> list:
        """``payload`` with at least ``k`` levels above the floor (refreshed if needed)."""
        if self.levels_left(payload) - k < self.floor:
            if self.ctx.max_level - k < self.floor:
                raise PrivmlError(f"privml: an op needs {k} levels but the parameters have only "
                                  f"{self.ctx.max_level - self.floor} between refreshes")
            return self._refresher().refresh(payload)
        return payload

    def apply_affine(self, payload: list, affine: Affine, src: Any, out_shape: tuple[int, ...],
                     dst: Any = None) -> tuple[list, Any]:
        return super().apply_affine(self.fit(payload, 1), affine, src, out_shape, dst)

    def poly(self, payload: list, coeffs: list[float], input_bound: float | None = None) -> list:
        from privml.he.kernels import poly_depth

        degree = max((i for i, c in enumerate(coeffs) if c), default=0)
        return super().poly(self.fit(payload, poly_depth(degree)), coeffs)

    def mul(self, a: list, b: list) -> list:
        return super().mul(self.fit(a, 1), self.fit(b, 1))

    def square(self, a: list) -> list:
        return super().square(self.fit(a, 1))

    def relu(self, payload: list) -> list:
        return self._refresher().relu(self.fit(payload, 1))


# --------------------------------------------------------------------------------------------- dry run
@dataclass(frozen=True)
class Track:
    """A keyless payload: levels left above the floor, the ciphertext noise bound (worst case, value units) and
    ``error``, a bound on the square root of the largest eigenvalue of the flooding errors' covariance, so on
    every slot's standard deviation whatever their correlation: a flood adds sigma^2 to it (independent), a
    linear map multiplies it by its spectral norm, slot-wise maps by their slope (first order)."""

    levels: int
    noise: float
    error: float = 0.0
    cts: int = 1  # ciphertexts per sample (latency) or per batch (throughput)

@dataclass
class RefreshPoint:
    where: str
    mode: str
    noise: float  # bound on the noise of the ciphertexts the enclave decrypts here (value units)
    ciphertexts: int




class HybridDryRuntime(Runtime):
    """Routes a model without keys: levels, refreshes, rotation steps and noise bounds for ``segment`` levels.

    ``noise`` is a :class:`privml.he.noise.NoiseModel`; ``value_bound`` bounds every value (calibrated
    maximum with headroom); ``sigma`` is the flooding standard deviation used to carry the error forward
    (0 on the first pass, which only collects the noise bounds that size it).
    """

    def __init__(self, layout: str, segment: int, noise: Any, value_bound: float, relu_mask_bits: int,
                 sigma: float = 0.0, slots: int = 1 << 13, batch: int = 1, cache: dict | None = None,
                 mask_bits: int = 20, carry_noise: bool = False, composed: int = COMPOSED_ROTATIONS,
                 split_before: frozenset[str] = frozenset()) -> None:
        if layout not in LAYOUTS:
            raise InvalidInput(f"privml: layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(None, layout, split_before=split_before)
        cache = cache if cache is not None else {}
        self._affine_cache = cache.setdefault("affine", {})  # shared by the planner's dry runs
        self._mv_cache = cache.setdefault("mv", {})
        self._slots = slots
        self.segment = segment
        self.noise = noise
        self.bound = value_bound
        self.relu_range = 2.0 ** relu_mask_bits
        self.sigma = sigma
        self.mask_error = value_bound * 2.0 ** (mask_bits - 50)
        self.batch = batch
        self.rotation_steps: set[int] = set()
        self.min_slots = 1
        self.refreshes: list[RefreshPoint] = []
        self.log: list[tuple[str, str, int, int]] = []
        self.max_need = 0
        self.expansion = None
        self.rotations = 0
        self.carry = carry_noise  # refreshes not flooded: the key-dependent noise stays in the message
        self.composed = composed  # key switches per rotation at worst (compositions from the chosen keys)
        self.plaintexts = 0  # encoded diagonals the block products cache (one forward pass)
        self.plaintexts_at: dict[int, int] = {}  # SEAL level -> plaintexts encoded there (memory prediction)
        self.live_at: dict[int, int] = {}  # SEAL level -> most ciphertexts alive at once there
        self.rotation_uses: dict[int, int] = {}  # rotation step -> rotations by it per forward pass
        self.mults = 0  # ciphertext-plaintext products per batch
        self.rotations_at: dict[int, int] = {}  # SEAL level -> rotations there (the planner's time prediction)
        self.mults_at: dict[int, int] = {}  # SEAL level -> ciphertext-plaintext products there

    @property
    def slots(self) -> int:
        return self._slots

    def _count(self, n_cts: int) -> int:
        """Ciphertexts of one payload (latency: per sample times the batch; throughput: per batch)."""
        return self.batch * n_cts if self.layout == "latency" else n_cts

    def encrypt(self, x: torch.Tensor) -> Track:
        self.min_slots = max(self.min_slots, 1 if self.layout == "latency" else x.shape[0])
        return Track(self.segment, self.noise.fresh, cts=self.input_packing(tuple(x.shape)).n_cts)

    def fit(self, t: Track, k: int) -> Track:
        self.max_need = max(self.max_need, k)
        if t.levels >= k:
            return t
        if k > self.segment:
            return Track(k, t.noise, t.error, t.cts)  # recorded in max_need; the planner refuses this segment
        where = current_module() or "(output: a pending linear map)"
        self.refreshes.append(RefreshPoint(where, "refresh", t.noise, self._count(t.cts)))
        self._live(self.segment + FLOOR, 2 * self._count(t.cts))  # masked copies and their fresh replacements
        # the masked values pass through float64 (decode, flood, encode, subtract): a few ulps of |x + m|
        fresh = self.noise.fresh + (t.noise if self.carry else 0.0)
        return Track(self.segment, fresh, math.hypot(t.error, self.sigma) + self.mask_error, t.cts)

    def _live(self, level: int, n: int) -> None:
        self.live_at[level] = max(self.live_at.get(level, 0), n)

    def _note(self, names: str, op: str, cost: int, t: Track) -> None:
        self.log.append((names, op, cost, self.segment - t.levels))

    def apply_affine(self, payload: Track, affine: Affine, src: Any, out_shape: tuple[int, ...],
                     dst: Any = None) -> tuple[Track, Any]:
        from privml.backends.linmaps import inf_norm, spectral_norm
        from privml.he import packing as packings

        dst = dst or packings.output_packing(src, out_shape, self.slots)
        t = self.fit(payload, 1)
        key = (affine.key, src, dst)
        hit = self._mv_cache.get(key)
        if hit is None:
            w = affine.weight
            terms = int(np.diff(w.indptr).max()) if w.nnz else 0
            nnz = w.nnz  # throughput, one feature per ciphertext: one scalar product per weight
            steps: set[int] = set()
            uses: dict[int, int] = {}
            rotations = babies = giants = plaintexts = 0
            live = src.n_cts + dst.n_cts  # one feature per ciphertext: every input and output at once
            if not (self.layout == "throughput" and src.per_ct == 1 and dst.per_ct == 1):
                mv = build_matvec(affine, src, dst, self.slots, None, self.key_mode)  # costed, not kept
                steps, rotations, uses = mv.rotation_steps(), int(mv.rotation_count), mv.rotation_uses()
                chain, giants, terms = mv.noise_shape()
                babies = chain
                plaintexts, nnz = int(mv.plaintext_count), int(mv.mult_count)
                live = int(mv.baby_count + mv.n_in_cts + mv.n_out_cts)
            hit = self._mv_cache[key] = (inf_norm(w), spectral_norm(w), steps, rotations, babies, giants, terms,
                                         plaintexts, nnz, uses, live)
        norm, spec, steps, rotations, babies, giants, terms, plaintexts, nnz, uses, live = hit
        times = self.batch if self.layout == "latency" else 1
        level = t.levels + FLOOR  # the SEAL level the product's input and plaintexts are at
        self.plaintexts_at[level] = self.plaintexts_at.get(level, 0) + plaintexts
        self._live(level, live * times)
        self._live(level - 1, 2 * dst.n_cts * times)  # output + activation
        babies, giants = babies * self.composed, giants * self.composed  # composed rotations: several key switches
        self.rotation_steps |= steps
        for step, count in uses.items():
            self.rotation_uses[step] = self.rotation_uses.get(step, 0) + count * times
        self.rotations += rotations * times
        self.plaintexts += plaintexts
        self.mults += nnz * times
        self.rotations_at[level] = self.rotations_at.get(level, 0) + rotations * times
        self.mults_at[level] = self.mults_at.get(level, 0) + nnz * times
        out = Track(t.levels - 1, self.noise.affine(t.noise, norm, babies, giants, terms, self.bound), spec * t.error,
                    dst.n_cts)
        self._note("+".join(dict.fromkeys(affine.names)), "linear", 1, out)
        return out, dst

    def poly(self, payload: Track, coeffs: list[float], input_bound: float | None = None) -> Track:
        from privml.he.kernels import poly_depth, poly_mult_count

        degree = max((i for i, c in enumerate(coeffs) if c != 0.0), default=0)
        k = poly_depth(degree)
        t = self.fit(payload, k)
        x = 1.25 * input_bound if input_bound is not None else self.bound  # inputs may leave the interval a little
        slope = sum(i * abs(c) * x ** (i - 1) for i, c in enumerate(coeffs) if i)
        size = sum(abs(c) * x**i for i, c in enumerate(coeffs))
        extra = poly_mult_count(coeffs) * (self.noise.ks + self.noise.rs) * max(1.0, size)
        out = Track(t.levels - k, slope * t.noise + extra, slope * t.error, t.cts)  # slot-wise
        self._note(current_module() or "", f"poly(deg {degree})", k, out)
        return out

    def mul(self, a: Track, b: Track) -> Track:
        a, b = self.fit(a, 1), self.fit(b, 1)
        return self._product(a, b)

    def square(self, a: Track) -> Track:
        a = self.fit(a, 1)  # one operand: refreshed once, as the runtime does
        return self._product(a, a)

    def _product(self, a: Track, b: Track) -> Track:
        x = self.bound
        out = Track(min(a.levels, b.levels) - 1, self.noise.product(a.noise, b.noise, x),
                    x * (a.error + b.error) + a.error * b.error, max(a.cts, b.cts))
        self._note(current_module() or "", "mul", 1, out)
        return out

    def add(self, a: Track, b: Track, negate_b: bool = False) -> Track:
        return Track(min(a.levels, b.levels), a.noise + b.noise, a.error + b.error, max(a.cts, b.cts))

    def relu(self, payload: Track) -> Track:
        t = self.fit(payload, 1)
        masked = self.noise.scalar(t.noise, self.relu_range, self.bound)
        self.refreshes.append(RefreshPoint(current_module() or "", "relu", masked, self._count(t.cts)))
        self._live(self.segment + FLOOR, 2 * self._count(t.cts))
        self.max_need = max(self.max_need, 1)
        carried = t.noise if self.carry else 0.0  # relu is 1-Lipschitz: carried noise passes at most unchanged
        out = Track(self.segment - 1, self.noise.scalar(self.noise.fresh, 1.0, self.relu_range * self.bound) + carried,
                    math.hypot(t.error, self.sigma), t.cts)  # relu is slot-wise and 1-Lipschitz
        self._note(current_module() or "", "relu (enclave)", 2, out)
        return out

    def levels_left(self, payload: Track) -> int:
        return payload.levels + FLOOR


# --------------------------------------------------------------------------------------------- the tensor
class HybridTensor(CKKSTensor):
    """CKKS ciphertexts whose runtime can ask the enclave for refreshes (and exact ReLUs)."""

    backend_name = "hybrid"


@HybridTensor.implements("relu")
def _relu(func: object, types: tuple, args: tuple, kwargs: dict) -> HybridTensor:
    x = (args[0] if args else kwargs["input"]).materialized()
    if not hasattr(x.runtime, "relu"):
        raise PrivmlError("privml: this runtime cannot evaluate ReLU in the enclave")
    return x.with_payload(x.runtime.relu(x.payload))


# --------------------------------------------------------------------------------------------- backend objects
def _hybrid_params(plan: Any) -> tuple[Any, list[int], str, dict]:
    from privml.he.params import CKKSParams

    ck, hy = plan.params.get("ckks"), plan.params.get("hybrid")
    if not ck or not hy:
        raise PrivmlError("privml: this plan has no hybrid parameters; compile the model with backend='hybrid'")
    return (CKKSParams.from_dict(ck), list(plan.params.get("rotation_steps", [])), plan.params.get("layout",
            "latency"), hy)


def enclave_policy(plan: Any, rate_limit: float, allowed_regions: tuple[str, ...] | None) -> Any:
    """The per-key policy the client provisions: budget, rate, flooding (sized by the plan), modes, regions."""
    from privml.enclave import Policy

    hy = plan.params["hybrid"]
    modes = ("refresh", "relu") if hy.get("enclave_activations") else ("refresh",)
    return Policy(decryption_budget=int(hy["decryption_budget"]), rate_limit=float(rate_limit),
                  flood_sigma=float(hy["flood_sigma"]), flood_security_bits=int(hy["flood_security_bits"]),
                  modes=modes, allowed_regions=tuple(allowed_regions) if allowed_regions else ())


class HybridBackend:
    """Client side: generates the keys, verifies the enclave's attestation, provisions the secret key to it."""

    name = "hybrid"

    def __init__(self, plan: Any, enclave: Any = None, allowed_regions: tuple[str, ...] | None = ("eu-central-1",),
                 rate_limit: float = 1e6, timeout: float = 60.0, release: bool = False, rekey: bool = True,
                 plaintext_cache_gb: float = 2.5) -> None:
        from privml import enclave as enc

        self.params, self.steps, self.layout, hy = _hybrid_params(plan)
        self.plan = plan
        self.release = release
        self.rekey = rekey
        self.rate_limit = rate_limit
        self.cache_bytes = int(plaintext_cache_gb * 1e9)
        self.allowed_regions = allowed_regions
        self.budget = int(hy["decryption_budget"])
        self.per_sample = sum(int(r["ciphertexts"]) for r in hy.get("refreshes", []))
        self._own = None
        if enclave is None:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="privml-enclave-")
            region = allowed_regions[0] if allowed_regions else "eu-central-1"
            enclave = self._own = enc.launch(self._tmp.name, region=region, timeout=timeout)
        missing = [a for a in ("address", "root_certificate", "region") if not hasattr(enclave, a)]
        if missing:
            raise InvalidInput(f"privml: enclave= must be an EnclaveProcess (privml.enclave.launch) or an object with "
                               f"address, root_certificate and region (the vendor root the attestation must chain to); "
                               f"got {type(enclave).__name__} without {', '.join(missing)}")
        self.enclave = enclave
        self.client = enc.EnclaveClient(enclave.address, timeout=timeout)
        self.keys_used = 0
        self.sent_batches: set[int] = set()
        self.runtime: HybridRuntime | None = None
        self._previous: dict[bytes, Any] = {}  # fingerprint -> runtime of keys rotated out (their results decrypt)
        self._provision()

    def _provision(self) -> None:
        """Fresh CKKS keys, the enclave's attestation verified, the secret key sent encrypted to it."""
        from privml import enclave as enc
        from privml.he.context import CKKSContext
        from privml.he.keys import KeySet
        from privml.he.serialize import dump_context

        hy = self.plan.params["hybrid"]
        ctx = CKKSContext.generate(self.params, self.steps)
        ctx.cache_bytes = self.cache_bytes
        k = ctx.keys  # the enclave needs no Galois keys
        secret = CKKSContext(KeySet(self.params, k.seal_context, k.public_key, k.relin_keys, k.galois_keys, (),
                                    k.secret_key, ctx.fingerprint))
        regions = tuple(self.allowed_regions) if self.allowed_regions else (self.enclave.region,)
        policy = enclave_policy(self.plan, self.rate_limit, regions)
        pinned = enc.EnclaveConfig(region=self.enclave.region) if self._own is not None else None  # PCR1 too
        self.attestation, self.receipt = enc.attest_and_provision(
            self.client, root_certificate=self.enclave.root_certificate, region_allowed=self.allowed_regions,
            secret_context=dump_context(secret, include_secret=True), policy=policy, config=pinned)
        refresher = Refresher(ctx, self.client, self.receipt.key_id, self.receipt.server_token, hy["value_bound"],
                              int(hy["mask_bits"]), int(hy["relu_mask_bits"]))
        if self.runtime is not None:  # rotated out: it only decrypts earlier results from now on
            self.ctx.clear_cache(keep_caching=False)
            self._previous[self.ctx.fingerprint] = self.runtime
            while len(self._previous) > 8:
                self._previous.pop(next(iter(self._previous)))
        self.ctx = ctx
        self.runtime = HybridRuntime(ctx, self.layout, refresher, split_before=split_before_of(self.plan))
        self.keys_used += 1

    def rotate_keys(self) -> None:
        """Generate and provision a fresh key (a fresh decryption budget); results under earlier keys still
        decrypt here. A separate server needs the new ``public_context()`` and ``server_credentials()``."""
        self._provision()

    def needed(self, batch: int) -> int:
        """Decryptions the plan's refreshes take for one batch (latency: per sample; throughput: per batch)."""
        return self.per_sample * (batch if self.layout == "latency" else 1)

    # ---- client
    def encrypt(self, x: torch.Tensor) -> HybridTensor:
        need = self.needed(int(x.shape[0]))
        if need > self.budget:
            raise InvalidInput(f"privml: this batch needs {need} enclave decryptions but a key allows "
                               f"{self.budget} (decryption_budget): encrypt smaller batches, or compile with a larger "
                               "decryption_budget (the flooding noise grows with its square root)")
        left = self.runtime.refresher.stats.budget_left
        if left is not None and need > left:
            if not self.rekey:
                raise DecryptionBudgetExhausted(
                    f"privml: this batch needs {need} enclave decryptions but only {left} are left on this key; "
                    "rotate_keys() (or a session with rekey=True) provisions a fresh one")
            self.rotate_keys()
        payload = self.runtime.encrypt(x)
        self.sent_batches.add(int(x.shape[0]))
        return HybridTensor(payload, tuple(x.shape), torch.float32, runtime=self.runtime, pending=None,
                            packing=self.runtime.input_packing(tuple(x.shape)))

    def check_ours(self, t: CKKSTensor) -> None:
        fingerprint = getattr(getattr(t.runtime, "ctx", None), "fingerprint", None)
        if fingerprint != self.ctx.fingerprint and fingerprint not in self._previous:
            raise KeyMaterialError("privml: this encrypted tensor was produced under another key set")
        if t.shape[0] not in self.sent_batches:
            raise MalformedInput(f"privml: the encrypted result has a batch of {t.shape[0]} samples but this session "
                                 f"only encrypted batches of {sorted(self.sent_batches)}")

    def decrypt(self, t: CKKSTensor, release: bool | None = None) -> torch.Tensor:
        """Decrypt; with ``release`` (or the session's ``release=True``) flood first, for outputs shown to others."""
        self.check_ours(t)
        t = t.materialized()
        runtime = self._previous.get(t.runtime.ctx.fingerprint, self.runtime)
        values = runtime.decrypt(t.payload, t.shape[0], t.packing)
        if self.release if release is None else release:
            sigma = float(self.plan.params["hybrid"]["release_sigma"])
            values = values + secure_normal(values.size, sigma).reshape(values.shape)
        out = torch.from_numpy(values).float().reshape(t.shape)
        if not torch.isfinite(out).all():
            raise MalformedInput("privml: decrypted values are not finite: the ciphertexts were corrupted")
        return out

    def public_context(self) -> bytes:
        from privml.he.serialize import dump_context

        return dump_context(self.ctx, include_secret=False)

    def server_credentials(self) -> dict[str, Any]:
        """What the server needs to reach the enclave for this key (no secret: the token only authorizes refreshes)."""
        return {"address": self.enclave.address, "key_id": self.receipt.key_id, "token": self.receipt.server_token}

    def dumps(self, t: CKKSTensor) -> bytes:
        return dumps(t)

    def loads(self, data: bytes) -> HybridTensor:
        return loads(data, self.runtime, HybridTensor)

    def audit(self) -> list:
        """The enclave's audit log for this session, verified (hash chain and signed head) before it is returned."""
        from privml.enclave import verify_audit_log

        nonce = os.urandom(16)
        entries, head = self.client.audit(nonce)
        verify_audit_log(entries, head, attestation=self.attestation, nonce=nonce)
        return entries

    def costs(self) -> dict[str, Any]:
        """Parameters, refresh totals over every key this session provisioned, and the current key's op counts."""
        p = self.ctx.params
        all_stats = [rt.refresher.stats for rt in (*self._previous.values(), self.runtime)]
        total = {k: sum(getattr(st, k) for st in all_stats) for k in ("requests", "ciphertexts", "seconds",
                                                                      "bytes_sent", "bytes_received")}
        return {"ring dimension N": p.poly_modulus_degree, "modulus chain (bits)": list(p.coeff_mod_bit_sizes),
                "scale bits": p.scale_bits, "security": f"{p.security_bits}-bit (HE standard)",
                "refresh requests": total["requests"], "refreshed ciphertexts": total["ciphertexts"],
                "refresh seconds": round(total["seconds"], 3),
                "refresh bytes": total["bytes_sent"] + total["bytes_received"],
                "keys provisioned": self.keys_used, "decryption budget left": self.runtime.refresher.stats.budget_left,
                "flood sigma": self.plan.params["hybrid"]["flood_sigma"],
                **{f"ops: {k}": v for k, v in self.ctx.stats.items()}}

    def visibility(self) -> list[dict[str, str]]:
        """Who saw what: client, server and the enclave."""
        hy = self.plan.params["hybrid"]
        signs = "; the sign of every activation (exact ReLU)" if hy.get("enclave_activations") else ""
        return [
            {"role": "client", "input": "plaintext (its own)", "weights": "no", "output": "plaintext (decrypted)",
             "keys": "secret key (provisioned to the enclave) + public context", "also sees": "the audit log"},
            {"role": "server", "input": "ciphertexts only", "weights": "plaintext (its own)",
             "output": "ciphertexts only", "keys": "public evaluation context + a refresh token (no secret key)",
             "also sees": "shapes, timing, how many refreshes it asks for"},
            {"role": f"enclave (region {self.attestation.region})", "input": "blinded values only",
             "weights": "no", "output": "blinded values only", "keys": "the secret key",
             "also sees": f"additively masked values (2^{hy['mask_bits']} x their bound){signs}"},
        ]

    def attacker_model(self) -> str:
        return ("honest-but-curious server (as for CKKS) plus a trusted enclave: it keeps the secret key confidential "
                "and is checked by attestation (PCRs, certificate chain to the pinned root, fresh nonce, region), a "
                "decryption budget and a signed hash-chained audit log; refreshes are blinded and noise-flooded "
                "(IND-CPA-D). Caveats: side channels are the known weakness of SGX-class enclaves, and a compromised "
                "enclave exposes every ciphertext under its key. Here the enclave is simulated.")

    def trust_statement(self) -> list[str]:
        hy = self.plan.params["hybrid"]
        relu = hy.get("enclave_activations")
        return [
            "client: holds the CKKS secret key; sees its inputs and the decrypted outputs only.",
            "server: model weights in clear, a public evaluation context (no secret key); sees ciphertexts, shapes "
            "and how many refreshes it asks for.",
            f"enclave (simulated TEE, measurement {self.attestation.pcrs[0].hex()[:16]}..., region "
            f"{self.attestation.region}): holds the secret key; sees values blinded by additive masks "
            f"(2^{hy['mask_bits']} x their bound) in refreshes"
            + (f", and positively masked values (factor <= 2^{hy['relu_mask_bits']}) in exact ReLUs: it learns "
               "each activation's sign" if relu else "") + ". If it is compromised, every ciphertext under this key "
            "is exposed; side channels are the known weakness of SGX-class enclaves.",
            (f"flooding: every refresh adds Gaussian noise of sigma {hy['flood_sigma']:.3g} "
             f"(s={hy['flood_security_bits']}, alpha={hy['decryption_budget']} decryptions per key); the enclave "
             "logs and budgets every decryption." if hy.get("flooding", "refresh") == "refresh" else
             "flooding at release: refreshes are not flooded (their key-dependent noise stays in the values, which "
             "only the client and the enclave ever see decrypted); outputs decrypted with release=True get "
             f"Gaussian noise of sigma {hy['release_sigma']:.3g} for the carried noise bound "
             f"(s={hy['flood_security_bits']}, alpha={hy['decryption_budget']}); the enclave logs and budgets "
             "every decryption."),
        ]

    def close(self) -> None:
        self.client.close()
        if self._own is not None:
            self._own.stop()
            self._own = None


class HybridServer:
    """Server side: runs a compiled model on ciphertexts with a public context, refreshing through the enclave."""

    def __init__(self, plan: Any, public_context: bytes, credentials: dict[str, Any], timeout: float = 60.0) -> None:
        from privml.enclave import EnclaveClient
        from privml.he.serialize import load_context

        params, _, layout, hy = _hybrid_params(plan)
        self.ctx = load_context(public_context)
        if self.ctx.params != params:
            raise InvalidInput("privml: the public context's parameters differ from the plan's")
        if self.ctx.has_secret_key:
            raise KeyMaterialError("privml: the context given to the server contains a secret key")
        self.ctx.cache_bytes = PLAINTEXT_CACHE_BYTES
        self.client = EnclaveClient(credentials["address"], timeout=timeout)
        refresher = Refresher(self.ctx, self.client, credentials["key_id"], credentials["token"], hy["value_bound"],
                              int(hy["mask_bits"]), int(hy["relu_mask_bits"]))
        self.runtime = HybridRuntime(self.ctx, layout, refresher, split_before=split_before_of(plan))

    def run(self, model: torch.nn.Module, request: bytes) -> bytes:
        x = loads(request, self.runtime, HybridTensor)
        try:
            y = model(x)
        except PrivmlError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise MalformedInput(f"privml: evaluating the request failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(y, HybridTensor):
            raise PrivmlError("privml: the model did not return an encrypted tensor")
        return dumps(y)

    def close(self) -> None:
        self.client.close()


def make_backend(plan: Any, **options: Any) -> HybridBackend:
    """Backend factory used by ``privml.Session``."""
    return HybridBackend(plan, **options)


def dry_run(model: torch.nn.Module, input_shape: tuple[int, ...], layout: str, segment: int, noise: Any,
            value_bound: float, relu_mask_bits: int, sigma: float = 0.0, slots: int = 1 << 13,
            batch: int = 1, cache: dict | None = None, mask_bits: int = 20, carry_noise: bool = False,
            composed: int = COMPOSED_ROTATIONS, split_before: frozenset[str] = frozenset()) -> HybridDryRuntime:
    """Route ``model`` without keys with ``segment`` levels between refreshes (``cache``: shared across runs),
    applying the linear maps of ``split_before`` apart."""
    rt = HybridDryRuntime(layout, segment, noise, value_bound, relu_mask_bits, sigma, slots, batch, cache, mask_bits,
                          carry_noise, composed, split_before)
    shape = (batch, *input_shape)
    x = HybridTensor(rt.encrypt(torch.empty(shape)), shape, torch.float32, runtime=rt, pending=None,
                     packing=rt.input_packing(shape))
    out = model(x)
    if not isinstance(out, HybridTensor):
        raise PrivmlError("privml: the model's output is not an encrypted tensor")
    out = out.finalize()
    rt.output = out.payload
    return rt
