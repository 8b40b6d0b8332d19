"""Hybrid planning: ring, scale and levels between enclave refreshes, under the flooding's precision cost.

For each ring N (8192, 16384) and segment depth D (levels between two refreshes) the chain is
``[60, s x (D + 1), 60]`` with the largest scale ``s <= 59`` that keeps 128-bit security; level 0 is never
used by data (headroom for blinded values). A keyless dry run (:func:`privml.backends.hybrid.dry_run`) routes
the model as the server will: it places every refresh (where an op needs more levels than are left, and
every ReLU when the enclave evaluates it), and bounds the noise of each ciphertext the enclave decrypts
(:mod:`privml.he.noise`). The flooding sigma is sized from the worst bound, then a second dry run carries the
flooding error to the outputs. Among the candidates whose predicted output error (6 sigma) is within
``max_output_error``, the cheapest (server work plus refresh round trips, by a measured cost model) wins.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from privml.compiler.calibrate import RangeStats
from privml.compiler.costs import FUSION_MARGIN, ckks_seconds, level_work
from privml.compiler.plan import Plan
from privml.errors import BudgetError, FidelityWarning, PrivmlError
from privml.tensor import module_scope

RINGS = (8192, 16384)
EDGE_PRIME_BITS = 60  # level-0 prime and special prime
MAX_SCALE_BITS = 59
MIN_SCALE_BITS = 20
MAX_SEGMENT = 12
HEADROOM = 2.0
# Measured on this machine (2 cores, SEAL via TenSEAL), per ciphertext: a refresh round trip (blind, send,
# decrypt, flood, encrypt, return, unblind) ~25 ms at N=16384 and ~9 ms at N=8192; rotations and products:
# privml.compiler.costs.ckks_seconds.
REFRESH_S = {8192: 11e-3, 16384: 20e-3}
ENCLAVE_SEES = {
    "refresh": "x + m with m uniform in +-2^mask_bits x value_bound per slot (each slot within statistical "
               "distance 2^-mask_bits of m alone; over many slots the few near the mask's edge leak their sign)",
    "relu": "r x with r in [1, 2^relu_mask_bits] per slot: each value's sign and its magnitude within that factor",
}


@dataclass
class Candidate:
    n: int
    segment: int
    scale_bits: int
    refreshes: list[dict]
    sigma: float
    noise_bound: float
    output_error: float
    output_noise: float
    seconds: float
    rotation_steps: list[int]
    min_slots: int
    feasible: bool
    why: str = ""
    over_budget: bool = False
    flooding: str = "refresh"
    key_switches: int = 0
    plaintexts: int = 0
    split: frozenset[str] = frozenset()  # linear maps applied apart instead of fused (privml.compiler.he_plan)

    def row(self) -> dict[str, Any]:
        return {"N": self.n, "segment": self.segment, "scale_bits": self.scale_bits, "flooding": self.flooding,
                "refreshes_per_sample": sum(r["ciphertexts"] for r in self.refreshes),
                "flood_sigma": self.sigma, "output_error": self.output_error,
                "predicted_seconds": round(self.seconds, 3), "feasible": self.feasible, "why": self.why}


def chain_for(n: int, segment: int) -> tuple[int, ...] | None:
    """``[60, s x (segment + 1), 60]`` with the largest scale within 128-bit security, or None."""
    from privml.he.params import HE_STANDARD_128

    s = min(MAX_SCALE_BITS, (HE_STANDARD_128[n] - 2 * EDGE_PRIME_BITS) // (segment + 1))
    if s < MIN_SCALE_BITS:
        return None
    return (EDGE_PRIME_BITS,) + (s,) * (segment + 1) + (EDGE_PRIME_BITS,)


def _candidate(gm: fx.GraphModule, input_shape: tuple[int, ...], layout: str, n: int, segment: int,
               bound: float, cfg: Any, out_tol: float, cache: dict,
               flooding: str = "refresh", split: frozenset[str] = frozenset()) -> Candidate | None:
    """One (ring, levels between refreshes, flooding) choice, costed and bounded by keyless dry runs.

    ``flooding="refresh"``: the enclave floods every refresh (LMSS sigma for the worst refreshed noise), so the
    noise restarts fresh after it. ``"release"``: refreshes add only a Gaussian the size of the noise one
    segment accumulates, the key-dependent noise is carried to the outputs, and the client floods what it
    releases with the LMSS
    sigma for the carried total (no party but the key holders ever sees an unreleased decryption)."""
    from privml.backends.hybrid import dry_run
    from privml.compiler.he_plan import galois_keys
    from privml.he.noise import TAIL, NoiseModel, flood_sigma

    chain = chain_for(n, segment)
    if chain is None:
        return None
    s = chain[1]
    noise = NoiseModel(n, s, primes=len(chain) - 1)
    common = dict(layout=layout, segment=segment, noise=noise, value_bound=bound, relu_mask_bits=cfg.relu_mask_bits,
                  slots=n // 2, cache=cache, mask_bits=cfg.mask_bits, split_before=split)
    with module_scope(gm):
        probe = dry_run(gm, input_shape, **common)
    steps, switches = galois_keys(probe.rotation_uses, n)
    composed = max_composition(probe.rotation_uses, steps, n // 2)
    if composed < probe.composed:  # the noise bounds with the rotations the chosen keys really take
        with module_scope(gm):
            probe = dry_run(gm, input_shape, **common, composed=composed)
    common["composed"] = composed
    if probe.max_need > segment:
        return Candidate(n, segment, s, [], 0, 0, math.inf, 0, math.inf, [], probe.min_slots, False,
                         f"an op needs {probe.max_need} levels", split=split)
    if probe.min_slots > n // 2:
        return Candidate(n, segment, s, [], 0, 0, math.inf, 0, math.inf, [], probe.min_slots, False,
                         f"needs {probe.min_slots} slots > {n // 2}", split=split)
    alpha, sec = cfg.decryption_budget, cfg.flood_security_bits
    worst = max((r.noise for r in probe.refreshes), default=noise.fresh)
    sigma = flood_sigma(worst, n, alpha, sec) if flooding == "refresh" else worst
    with module_scope(gm):  # release flooding: the noise each refresh bakes in is carried to the outputs
        run = dry_run(gm, input_shape, **{**common, "sigma": sigma, "carry_noise": flooding == "release"})
    out = run.output
    per_ct = REFRESH_S.get(n, REFRESH_S[16384] * n / 16384)
    refreshes = [{"where": r.where, "mode": r.mode, "ciphertexts": r.ciphertexts, "noise_bound": r.noise,
                  "predicted_ms": round(r.ciphertexts * per_ct * 1e3, 1)}
                 for r in run.refreshes]
    seconds = ckks_seconds(n, level_work(run.rotations_at, run.mults_at, switches, lambda level: level + 1))
    seconds += sum(r.ciphertexts for r in run.refreshes) * per_ct
    err = TAIL * float(out.error)
    per_batch = sum(r["ciphertexts"] for r in refreshes)  # latency: per sample; throughput: per batch
    if per_batch > cfg.decryption_budget:
        return Candidate(n, segment, s, refreshes, sigma, worst, err, float(out.noise), seconds,
                         steps, run.min_slots, False,
                         f"{per_batch} enclave decryptions per {'sample' if layout == 'latency' else 'batch'} > "
                         f"decryption_budget {cfg.decryption_budget}", over_budget=True, flooding=flooding,
                         key_switches=switches, plaintexts=run.plaintexts, split=split)
    ok = err <= out_tol
    return Candidate(n, segment, s, refreshes, sigma, worst, err, float(out.noise), seconds,
                     steps, run.min_slots, ok,
                     "" if ok else f"predicted output error {err:.3g} > {out_tol:.3g}", flooding=flooding,
                     key_switches=switches, plaintexts=run.plaintexts, split=split)


def _choose_fusion(gm: fx.GraphModule, plan: Plan, cfg: Any, best: Candidate, bound: float, out_tol: float,
                   cache: dict) -> tuple[Candidate, list[dict[str, Any]]]:
    """Where two position-mixing linear maps meet, fuse them or apply them apart, by predicted seconds on the
    chosen ring and segment (refreshes included: a split costs a level, so it may add refreshes); the table
    of every point for the plan. A split is taken only if it keeps the plan feasible (or lowers its error)."""
    from privml.backends.hybrid import dry_run
    from privml.he.noise import NoiseModel

    with module_scope(gm):
        rt = dry_run(gm, plan.input_shape, cfg.layout, best.segment, NoiseModel(best.n, best.scale_bits), bound,
                     cfg.relu_mask_bits, slots=best.n // 2, cache=cache)

    def side(c: Candidate) -> dict[str, Any]:
        return {"N": c.n, "segment": c.segment, "refreshes": sum(r["ciphertexts"] for r in c.refreshes),
                "key_switches": c.key_switches, "plaintexts": c.plaintexts, "predicted_seconds": round(c.seconds, 4)}

    table = []
    for op, pending in rt.fusion_points.items():
        row: dict[str, Any] = {"op": op, "pending": pending, "chosen": "fused"}
        if rt.mixing_steps.get(op, 0) != 1:
            row["why"] = "the op applies several position-mixing maps (a module called twice, or functional ops)"
        elif cfg.fusion != "auto":
            row["chosen"] = "split" if cfg.fusion == "never" else "fused"
            row["why"] = f"fusion={cfg.fusion!r}"
        else:
            try:
                alt = _candidate(gm, plan.input_shape, cfg.layout, best.n, best.segment, bound, cfg, out_tol, cache,
                                 best.flooding, best.split | {op})
            except PrivmlError as err:  # the split cannot run
                alt, row["why"] = None, f"split refused: {str(err)[:120]}"
            if alt is not None:
                row["fused"], row["split"] = side(best), side(alt)
                ok = alt.feasible if best.feasible else alt.output_error <= best.output_error
                if not math.isfinite(alt.seconds) or alt.over_budget or not ok:
                    row["why"] = f"split refused: {alt.why or 'a larger predicted output error'}"
                elif alt.seconds < FUSION_MARGIN * best.seconds:
                    row["chosen"], row["why"] = "split", f"predicted {alt.seconds:.3g} s split vs {best.seconds:.3g} s"
                    best = alt
                else:
                    row["why"] = f"predicted {alt.seconds:.3g} s split vs {best.seconds:.3g} s fused"
            elif "why" not in row:
                row["why"] = "split refused: no chain fits"
        table.append(row)
    if cfg.fusion == "never":
        splits = frozenset(r["op"] for r in table if r["chosen"] == "split")
        if splits:
            alt = _candidate(gm, plan.input_shape, cfg.layout, best.n, best.segment, bound, cfg, out_tol, cache,
                             best.flooding, splits)
            if alt is None or not math.isfinite(alt.output_error) or alt.over_budget:
                raise BudgetError(f"privml: fusion='never' does not fit N={best.n} with {best.segment} levels between "
                                  f"refreshes ({alt.why if alt else 'no chain'}): use fusion='auto'")
            best = alt
    return best, table


def max_composition(uses: dict[int, int], steps: list[int], slots: int) -> int:
    """Most key switches one rotation of ``uses`` takes with Galois keys for ``steps``."""
    from privml.he.rotations import decompose

    return max((len(decompose(u, steps, slots)) for u in uses if u % slots), default=1)


def plan_hybrid(gm: fx.GraphModule, stats: dict[str, RangeStats], plan: Plan, cfg: Any) -> None:
    """Fill ``plan.params`` for the hybrid backend (CKKS parameters, refreshes, flooding, candidates table)."""
    from privml.compiler.he_plan import _levels_into_layers
    from privml.he.noise import flood_sigma, precision_cost_bits

    bound = max((st.abs_max for st in stats.values()), default=1.0) * HEADROOM
    lo, hi = plan.params["output_range"]
    out_tol = cfg.max_output_error if cfg.max_output_error is not None else 0.01 * (hi - lo)
    rings = (cfg.poly_modulus_degree,) if cfg.poly_modulus_degree else RINGS
    segments = (cfg.refresh_depth,) if cfg.refresh_depth else range(1, MAX_SEGMENT + 1)
    found: list[Candidate] = []
    cache: dict = {}
    modes = ("refresh", "release") if cfg.flooding == "auto" else (cfg.flooding,)
    for flooding in modes:
        if found and any(c.feasible for c in found):
            break  # "auto": release flooding only when flooding every refresh cannot meet the tolerance
        for n in rings:
            for d in segments:
                c = _candidate(gm, plan.input_shape, cfg.layout, n, d, bound, cfg, out_tol, cache, flooding)
                if c is not None:
                    found.append(c)
    usable = [c for c in found if math.isfinite(c.output_error) and not c.over_budget]
    if not usable and any(c.over_budget for c in found):
        least = min((c for c in found if c.over_budget), key=lambda c: sum(r["ciphertexts"] for r in c.refreshes))
        raise BudgetError(f"privml: every hybrid plan needs more enclave decryptions than a key allows ({least.why}): "
                          "raise decryption_budget (the flooding noise grows with its square root), use the latency "
                          "layout, or fewer activations")
    if not usable:
        why = "; ".join(f"N={c.n}, {c.segment} levels: {c.why}" for c in found[:6]) or "no chain fits"
        raise BudgetError(f"privml: no hybrid parameters fit this model ({why}); lower polynomial degrees "
                          "(refresh_depth=, max_error=) or use a larger ring")
    feasible = [c for c in usable if c.feasible]
    best = min(feasible, key=lambda c: c.seconds) if feasible else min(usable, key=lambda c: c.output_error)
    best, fusion = _choose_fusion(gm, plan, cfg, best, bound, out_tol, cache)
    # what a session checks (privml.session): the carried output noise or one refresh's, whichever is larger
    release = flood_sigma(max(best.output_noise, best.noise_bound, 1e-300), best.n, cfg.decryption_budget,
                          cfg.flood_security_bits)
    if best.flooding == "release" and cfg.flooding == "auto":
        plan.notes.append(
            "privml: flooding every refresh would cost more precision than the tolerance allows, so refreshes "
            "are not flooded (flooding='release'): the key-dependent noise is carried to the outputs, the client's "
            "own decryptions are exact, and outputs shown to anyone else must be decrypted with release=True "
            f"(Gaussian of sigma {release:.3g}). Compile with flooding='refresh' to flood every refresh anyway.")
        warnings.warn(plan.notes[-1], UserWarning, stacklevel=4)
    if not feasible:
        plan.notes.append(
            f"privml: with flooding at s={cfg.flood_security_bits} bits for {cfg.decryption_budget} decryptions "
            f"per key, the predicted output error is {best.output_error:.3g} (6 sigma), above the tolerance "
            f"{out_tol:.3g} (max_output_error): lower decryption_budget (fewer decryptions per key), relu_mask_bits "
            "or the number of refreshes")
        warnings.warn(plan.notes[-1], FidelityWarning, stacklevel=4)
    from privml.backends.hybrid import FLOOR
    from privml.he.params import CKKSParams

    chain = chain_for(best.n, best.segment)
    params = CKKSParams(best.n, chain, best.scale_bits).check()
    plan.params.update({
        "layout": cfg.layout,
        "ckks": params.to_dict(),
        "depth": best.segment,
        "security_bits": params.security_bits,
        "poly_modulus_degree": best.n,
        "rotation_steps": best.rotation_steps,
        "max_abs_value": bound,
        "input_expansion": None,
        "hybrid": {
            "segment": best.segment, "floor": FLOOR, "enclave_activations": bool(cfg.enclave_activations),
            "decryption_budget": int(cfg.decryption_budget), "flood_security_bits": int(cfg.flood_security_bits),
            "mask_bits": int(cfg.mask_bits), "relu_mask_bits": int(cfg.relu_mask_bits), "value_bound": bound,
            "noise_bound": best.noise_bound, "flood_sigma": best.sigma, "release_sigma": release,
            "flooding": best.flooding, "output_noise_bound": best.output_noise, "key_switches": best.key_switches,
            "precision_cost_bits": precision_cost_bits(best.n, cfg.decryption_budget, cfg.flood_security_bits),
            "output_error_bound": best.output_error, "output_tolerance": out_tol,
            "refreshes": best.refreshes, "predicted_seconds_per_sample": best.seconds,
            "enclave_sees": {m: ENCLAVE_SEES[m] for m in sorted({r["mode"] for r in best.refreshes})},
            "candidates": [c.row() for c in found],
        },
    })
    with module_scope(gm):
        from privml.backends.hybrid import dry_run
        from privml.he.noise import NoiseModel

        rt = dry_run(gm, plan.input_shape, cfg.layout, best.segment, NoiseModel(best.n, best.scale_bits),
                     bound, cfg.relu_mask_bits, slots=best.n // 2, cache=cache, split_before=best.split)
    from privml.he import memory

    # the client's process: its keys, the weights' encoded diagonals, the ciphertexts of one forward pass (the
    # enclave is a process of its own, which a session that launches it adds: privml.session)
    mem = memory.estimate(params, len(best.rotation_steps), rt.plaintexts_at, rt.live_at)
    plan.params["memory_gb"] = mem.to_dict()
    plan.params["public_context_mb"] = round(memory.public_context_bytes(params, len(best.rotation_steps)) / 1e6, 1)
    plan.params["fusion"] = fusion
    plan.params["split_before"] = sorted(best.split)
    _levels_into_layers(plan, rt.log)
