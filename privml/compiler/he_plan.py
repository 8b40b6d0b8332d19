"""CKKS planning: exact depth, rotation steps and slots from a keyless dry run, then parameters.

The dry run routes the (approximated) model through the CKKS backend's own op table
with no ciphertexts, so the depth the plan states is the depth the backend consumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from privml.compiler.calibrate import RangeStats
from privml.compiler.costs import CKKS_HEADROOM as HEADROOM
from privml.compiler.costs import FUSION_MARGIN, ckks_seconds, level_work
from privml.compiler.plan import Plan
from privml.errors import BudgetError, DepthExhausted, PrivmlError
from privml.tensor import module_scope

KEY_COST = 1.0  # a Galois key is worth keeping if it saves this many key switches per forward pass


@dataclass
class _Routed:
    """One way of running the model: its parameters, keys and dry run, and the predicted seconds per call."""

    split: frozenset[str]
    params: Any
    rt: Any
    lanes: int | None
    key_mode: str
    steps: list[int]
    switches: int
    seconds: float


def _route(gm: fx.GraphModule, plan: Plan, layout: str, split: frozenset[str], max_abs: float, precision_bits: int,
           poly_modulus_degree: int | None, scale_bits: int | None, coeff_mod_bit_sizes: tuple[int, ...] | None,
           input_expansion: bool, batch_size: int | None, max_context_mb: float | None,
           rotation_keys: str, fold: bool = True, no_fold: frozenset[str] = frozenset()) -> _Routed:
    """Dry-run the model with the linear maps ``split`` apart, size its parameters and choose its Galois keys.

    ``fold``: single-ciphertext products may fold (:meth:`privml.he.kernels.BlockMatVec._fold`); the maps
    whose partial sums could overflow a level of the chosen parameters go to ``no_fold`` and the model is routed
    again."""
    from privml.backends.ckks import dry_run
    from privml.he import memory
    from privml.he.params import choose_params

    lanes = None
    if layout == "throughput" and batch_size is not None:
        lanes = 1 << max(0, int(batch_size) - 1).bit_length()
    run = dict(input_expansion=input_expansion, split_before=split, fold_bound=max_abs if fold else None,
               no_fold=no_fold)
    with module_scope(gm):
        rt = dry_run(gm, plan.input_shape, layout, lanes=lanes, **run)
    breakdown = [(names, cost) for names, _, cost, _ in rt.log]

    def sized(bound: float) -> Any:
        return choose_params(rt.depth, max_abs_value=bound, precision_bits=precision_bits,
                             min_slots=rt.min_slots if layout == "throughput" else 1,
                             poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits,
                             coeff_mod_bit_sizes=coeff_mod_bit_sizes, depth_breakdown=breakdown)

    try:
        params = sized(max_abs)
    except DepthExhausted as err:
        raise DepthExhausted(f"privml: {err}") from None
    last, sources = rt.spill_at.get(rt.depth, (0.0, frozenset()))
    if last > max_abs:  # spill at the last level: a larger first prime holds it, if the ring stays the same
        try:
            wider = sized(last * 4.04)  # _spill_over's margin
        except PrivmlError:
            wider = None
        if wider is None or wider.poly_modulus_degree != params.poly_modulus_degree:
            return _route(gm, plan, layout, split, max_abs, precision_bits, poly_modulus_degree, scale_bits,
                          coeff_mod_bit_sizes, input_expansion, batch_size, max_context_mb, rotation_keys,
                          fold=bool(sources - no_fold), no_fold=no_fold | sources)
        params = wider
    if lanes is not None and lanes * 2 > params.poly_modulus_degree // 2:
        lanes = None  # one feature per ciphertext is as good when a batch fills more than half the slots
    if params.poly_modulus_degree // 2 != rt.slots or lanes is None:  # packings and steps depend on the slots
        with module_scope(gm):
            rt = dry_run(gm, plan.input_shape, layout, slots=params.poly_modulus_degree // 2, lanes=lanes, **run)
    max_keys = None if max_context_mb is None else memory.keys_within(params, max_context_mb * 1e6)
    options = []  # (cost, key mode, dry run, Galois key steps, key switches per forward pass)
    for mode in ("direct", "few") if rotation_keys == "auto" else (rotation_keys,):
        if mode == "few" or rt.key_mode != mode:
            with module_scope(gm):
                rt = dry_run(gm, plan.input_shape, layout, slots=params.poly_modulus_degree // 2, lanes=lanes,
                             key_mode=mode, **run)
        least = _min_keys(rt.rotation_uses, params.slots)
        if max_keys is not None and max_keys < least:
            options.append((None, mode, rt, least, None))
            continue
        steps, switches = galois_keys(rt.rotation_uses, params.poly_modulus_degree, max_keys)
        options.append((switches + KEY_COST * len(steps), mode, rt, steps, switches))
    fitting = [o for o in options if o[0] is not None]
    if not fitting:
        need = memory.public_context_bytes(params, min(o[3] for o in options)) / 1e6
        raise BudgetError(f"privml: the public context needs at least {need:.0f} MB at N="
                          f"{params.poly_modulus_degree} (fewest Galois keys), over max_context_mb="
                          f"{max_context_mb:g}: raise the limit, lower the depth or the precision (a smaller ring)")
    _, key_mode, rt, steps, switches = min(fitting, key=lambda o: (o[0], o[1] != "direct"))
    over = _spill_over(rt.spill_at, params)
    if over is not None:  # fewer folds (none when the overflow names no map)
        return _route(gm, plan, layout, split, max_abs, precision_bits, poly_modulus_degree, scale_bits,
                      coeff_mod_bit_sizes, input_expansion, batch_size, max_context_mb, rotation_keys,
                      fold=bool(over - no_fold), no_fold=no_fold | over)
    primes = len(params.coeff_mod_bit_sizes) - 1  # data primes of a fresh ciphertext
    work = level_work(rt.rotations_at, rt.mults_at, switches, lambda used: primes - used)
    return _Routed(split, params, rt, lanes, key_mode, steps, switches, ckks_seconds(params.poly_modulus_degree, work))


RESCALE_FIRST_BITS = 4  # scale bits beyond precision + noise that let giant rotations follow the rescale


def _rescale_first(params: Any, precision_bits: int) -> bool:
    """Whether single-ciphertext products rescale before their giant rotations (one prime cheaper each): only
    where the scale exceeds what the precision needs by RESCALE_FIRST_BITS, since each such rotation's noise
    is then not divided by the dropped prime (up to 16 giant steps: 4 bits)."""
    from privml.he.params import noise_bits

    return params.scale_bits >= precision_bits + noise_bits(params.poly_modulus_degree) + RESCALE_FIRST_BITS


def _spill_over(spill_at: dict[int, tuple[float, frozenset[str]]], params: Any) -> frozenset[str] | None:
    """The folded maps whose spill (a dry run's levels used -> (bound, sources)) could exceed what its level
    holds, checked with 2 bits more margin than the runtime's check (``Runtime.value_limit``: a quarter of the
    modulus over the scale), as SEAL's primes lie below their bit sizes and canonical scales above 2^scale_bits;
    None where every bound fits."""
    bits, over = params.coeff_mod_bit_sizes, None
    for used, (bound, sources) in spill_at.items():
        level = params.depth - used
        if level < 0 or not bound < 2.0 ** (sum(bits[: level + 1]) - 5 - params.scale_bits):
            over = (over or frozenset()) | sources
    return over


def _fusion_row(point: str, pending: str, fused: _Routed, split: _Routed | None, why: str = "") -> dict[str, Any]:
    def side(r: _Routed) -> dict[str, Any]:
        return {"depth": r.rt.depth, "N": r.params.poly_modulus_degree, "key_switches": r.switches,
                "products": r.rt.mults, "plaintexts": r.rt.plaintexts, "predicted_seconds": round(r.seconds, 4)}

    row = {"op": point, "pending": pending, "fused": side(fused), "split": side(split) if split else None}
    row["chosen"] = "split" if split is not None and split.seconds < FUSION_MARGIN * fused.seconds else "fused"
    row["why"] = why or (f"predicted {split.seconds:.3g} s split vs {fused.seconds:.3g} s fused" if split else "")
    return row


def plan_ckks(gm: fx.GraphModule, stats: dict[str, RangeStats], plan: Plan, layout: str = "latency",
              precision_bits: int = 20, poly_modulus_degree: int | None = None, scale_bits: int | None = None,
              coeff_mod_bit_sizes: tuple[int, ...] | None = None, input_expansion: bool = True,
              batch_size: int | None = None, max_context_mb: float | None = None,
              rotation_keys: str = "auto", fusion: str = "auto", depth_budget: int | None = None,
              fold: bool = True) -> None:
    """Fill ``plan.params`` (CKKS parameters, rotation steps, layout, fusions) and the per-layer levels.

    ``batch_size`` (throughput layout): pack for batches of at most that many samples. Below half the
    slots each feature takes ``lanes`` = the next power of two slots, so one ciphertext holds slots/lanes
    features (450 samples: 16 features per ciphertext at N=16384 instead of one) and linear maps become
    block diagonal products between fewer ciphertexts. ``max_context_mb`` caps the public context: fewer
    Galois keys, the missing rotations composed from the others (more key switches, stated in the plan).

    ``fusion``: where two linear maps that both move values meet (a pooling before a conv, a conv before a
    linear), ``auto`` fuses them (one level, the product's diagonals) or applies them apart (one more level,
    each map's own diagonals) by predicted seconds, one point at a time; ``always``/``never`` force it. The
    plan's ``fusion`` table shows each point, both costs and the choice. ``auto`` never splits past
    ``depth_budget``. ``fold``: see :func:`_route`."""
    from privml.he import memory

    max_abs = max((st.abs_max for st in stats.values()), default=1.0) * HEADROOM
    route = functools.partial(_route, gm, plan, layout, max_abs=max_abs, precision_bits=precision_bits,
                              poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits,
                              coeff_mod_bit_sizes=coeff_mod_bit_sizes, input_expansion=input_expansion,
                              batch_size=batch_size, max_context_mb=max_context_mb, rotation_keys=rotation_keys,
                              fold=fold)
    best = route(frozenset())
    points = dict(best.rt.fusion_points)
    several = {op for op in points if best.rt.mixing_steps.get(op, 0) != 1}  # a split is named by its op
    table = {op: {"op": op, "pending": pend, "chosen": "fused", "why": "the op applies several position-mixing "
                  "maps (a module called twice, or functional ops): kept fused"} for op, pend in points.items()
             if op in several}
    splittable = {op: pend for op, pend in points.items() if op not in several}
    if fusion == "never" and splittable:
        best = route(frozenset(splittable))
        table.update({op: {"op": op, "pending": pend, "chosen": "split", "why": "fusion='never'"}
                      for op, pend in splittable.items()})
    elif fusion == "auto":
        for op, pend in splittable.items():
            try:
                alt = route(best.split | {op})
            except PrivmlError as err:  # one more level does not fit the limits, or the split cannot run
                table[op] = _fusion_row(op, pend, best, None, f"split refused: {str(err)[:120]}")
                continue
            if depth_budget is not None and alt.rt.depth > depth_budget:
                table[op] = _fusion_row(op, pend, best, None, f"split refused: depth {alt.rt.depth} > depth_budget "
                                                             f"{depth_budget}")
                continue
            table[op] = _fusion_row(op, pend, best, alt)
            if table[op]["chosen"] == "split":
                best = alt
    else:
        table.update({op: {"op": op, "pending": pend, "chosen": "fused", "why": f"fusion={fusion!r}"}
                      for op, pend in splittable.items()})
    table = [table[op] for op in points]  # in the order the model meets them
    params, rt, steps = best.params, best.rt, best.steps
    top = params.depth
    mem = memory.estimate(params, len(steps), {top - d: n for d, n in rt.plaintexts_at.items()},
                          {top - d: n for d, n in rt.live_at.items()})
    plan.params.update({
        "layout": layout,
        "lanes": best.lanes,
        "ckks": params.to_dict(),
        "depth": rt.depth,
        "security_bits": params.security_bits,
        "poly_modulus_degree": params.poly_modulus_degree,
        "rotation_steps": steps,
        "key_switches": best.switches,
        "key_mode": best.key_mode,
        "split_before": sorted(best.split),
        "fusion": table,
        "predicted_seconds": round(best.seconds, 4),
        "public_context_mb": round(memory.public_context_bytes(params, len(steps)) / 1e6, 1),
        "memory_gb": mem.to_dict(),
        "max_abs_value": max_abs,
        "input_expansion": rt.expansion.to_dict() if rt.expansion is not None else None,
        "fold_bound": rt.fold_bound,  # None: no product folds (privml.backends.ckks.Runtime)
        "rescale_first": _rescale_first(params, precision_bits),
        "no_fold": sorted(rt.no_fold),
        "folded": rt.folded,
    })
    _levels_into_layers(plan, rt.log)


def _min_keys(uses: dict[int, int], slots: int) -> int:
    """The fewest Galois keys :func:`galois_keys` can give: one per used step, or the powers of two of their
    non-adjacent forms if those are fewer."""
    from privml.he.rotations import _signed, naf

    used = {int(s) % slots for s in uses} - {0}
    return min(len(used), len({t % slots for s in used for t in naf(_signed(s, slots))}))


def galois_keys(uses: dict[int, int], poly_modulus_degree: int, max_keys: int | None = None) -> tuple[list[int], int]:
    """(rotation steps to generate Galois keys for, key switches per forward pass): every used step gets its own
    key while the plan's key limit allows, else powers of two plus the most used steps (compositions)."""
    import math

    from privml.compiler.plan import ROTATION_STEPS_PER_LOG_N
    from privml.he.rotations import choose_keys

    slots = poly_modulus_degree // 2
    limit = ROTATION_STEPS_PER_LOG_N * int(math.log2(poly_modulus_degree))
    keys, switches = choose_keys(uses, slots, min(limit, max_keys or limit))
    return sorted(k - slots if k > slots // 2 else k for k in keys), switches


def _levels_into_layers(plan: Plan, log: list[tuple[str, str, int, int]]) -> None:
    """Write the dry run's per-op levels into the plan rows (fused linear ops share one level)."""
    by_name = {lp.name: lp for lp in plan.layers}
    for lp in plan.layers:
        lp.depth, lp.level = 0, None
    for names, _op, cost, after in log:
        parts = names.split("+")
        for i, name in enumerate(parts):
            lp = by_name.get(name)
            if lp is None:
                continue
            last = i == len(parts) - 1
            lp.depth = (lp.depth or 0) + (cost if last else 0)
            lp.level = after
            if not last:
                lp.approx = f"fused into {parts[-1]}"
    running = 0
    for lp in plan.layers:
        running = lp.level if lp.level is not None else running
        lp.level = running
