"""Which Galois keys to generate, and how a rotation without its own key is composed from those there are.

A Galois key per rotation step is fast (one key switch per rotation) but costs key bytes: at N=16384 with
four primes one key is ~6 MB, and a ResNet's block products use a few hundred distinct steps. Any step is a
sum of signed powers of two (its non-adjacent form, at most ~log2(slots)/2 terms), so with the power-of-two
keys every rotation is possible; :func:`choose_keys` starts from the powers of two the used steps need and
adds a direct key for the steps whose uses save the most key switches, up to a key budget. The choice
minimises the key switches per forward pass for that many keys; the plan states both numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def _signed(step: int, slots: int) -> int:
    """The representative of ``step`` mod slots in (-slots/2, slots/2]."""
    r = int(step) % slots
    return r - slots if r > slots // 2 else r


def naf(n: int) -> list[int]:
    """Non-adjacent form of ``n``: signed powers of two summing to it, no two adjacent (fewest terms)."""
    out, bit = [], 1
    while n:
        if n & 1:
            z = 2 - (n & 3)  # +1 or -1
            out.append(z * bit)
            n -= z
        n >>= 1
        bit <<= 1
    return out


def decompose(step: int, keys: Iterable[int], slots: int) -> tuple[int, ...]:
    """Steps (each with a key in ``keys``, normalized mod slots) whose rotations compose to ``step``.

    The step's own key if there is one; else the shortest of: the non-adjacent form, or one direct key plus
    the non-adjacent form of the rest. Raises ValueError when a needed power of two has no key."""
    have = {int(k) % slots for k in keys}
    target = int(step) % slots
    if target == 0:
        return ()
    if target in have:
        return (target,)
    best: tuple[int, ...] | None = None
    for base in [0, *sorted(have)]:
        rest = naf(_signed(target - base, slots))
        terms = ([base] if base else []) + [t % slots for t in rest]
        if all(t in have for t in terms) and (best is None or len(terms) < len(best)):
            best = tuple(terms)
    if best is None:
        raise ValueError(f"no composition of rotation step {step} from keys {sorted(have)}")
    return best


def choose_keys(uses: Mapping[int, int], slots: int, max_keys: int) -> tuple[set[int], int]:
    """(Galois key steps, key switches per forward pass) for rotation ``uses`` (step -> count) within
    ``max_keys`` keys: every used step direct when that fits, else the powers of two plus the most valuable
    direct keys."""
    used = {int(s) % slots: 0 for s in uses}
    for s, c in uses.items():
        if int(s) % slots:
            used[int(s) % slots] += int(c)
    used.pop(0, None)
    if len(used) <= max_keys:
        return set(used), sum(used.values())
    keys = {t % slots for s in used for t in naf(_signed(s, slots))}
    cost = {s: len(naf(_signed(s, slots))) for s in used}
    while len(keys) < max_keys:
        gain, pick = max(((c * (cost[s] - 1), s) for s, c in used.items() if s not in keys), default=(0, None))
        if pick is None or gain <= 0:
            break
        keys.add(pick)
        cost[pick] = 1
        for s in used:
            if s not in keys:
                alt = naf(_signed(s - pick, slots))
                if all(t % slots in keys for t in alt):
                    cost[s] = min(cost[s], 1 + len(alt))
    needed = {t for s in used for t in decompose(s, keys, slots)}  # drop keys no composition uses any more
    keys &= needed
    return keys, sum(c * len(decompose(s, keys, slots)) for s, c in used.items())
