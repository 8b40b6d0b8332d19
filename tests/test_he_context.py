"""CKKSContext on real SEAL ciphertexts: every op against numpy, guards, counters, key hygiene, serialization."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from privml.errors import BudgetError, DepthExhausted, InvalidInput, KeyMaterialError, MalformedInput
from privml.he import serialize
from privml.he.context import CKKSContext, seal_to_bytes
from privml.he.params import choose_params

TOL = 1e-5  # absolute, values in [-1, 1] at scale 2^40 (measured errors are ~1e-7 .. 2e-6)
N_VALS = 100


@pytest.fixture(scope="module")
def ctx() -> CKKSContext:
    params = choose_params(3, poly_modulus_degree=8192)  # [43, 40, 40, 40, 43], scale 2^40
    return CKKSContext.generate(params, rotation_steps=[1, -1, 5])


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, N_VALS), rng.uniform(-1, 1, N_VALS)


def dec(ctx: CKKSContext, ct, n: int = N_VALS) -> np.ndarray:
    return ctx.decrypt(ct)[:n]


def test_properties(ctx: CKKSContext) -> None:
    assert ctx.slots == 4096 and ctx.max_level == 3 and ctx.has_secret_key
    assert ctx.scale == 2.0**40
    assert ctx.rotation_steps == frozenset({1, 4095, 5})
    assert ctx.has_rotation_key(-1) and ctx.has_rotation_key(0) and not ctx.has_rotation_key(2)
    for lvl in range(ctx.max_level + 1):
        assert abs(ctx.scale_at(lvl) / ctx.scale - 1) < 1e-5


def test_encrypt_decrypt(ctx: CKKSContext, xy) -> None:
    x, _ = xy
    ct = ctx.encrypt(x)
    assert ctx.level(ct) == ctx.max_level
    out = ctx.decrypt(ct)
    assert out.shape == (ctx.slots,)
    assert np.abs(out[:N_VALS] - x).max() < TOL
    assert np.abs(out[N_VALS:]).max() < TOL  # zero padded
    assert np.abs(dec(ctx, ctx.encrypt(list(x[:3])), 3) - x[:3]).max() < TOL


@pytest.mark.parametrize(
    "bad",
    [np.zeros(4097), np.array([1.0, np.nan]), np.array([np.inf]), np.zeros((2, 2)), ["a", "b"]],
)
def test_encrypt_rejects_bad_input(ctx: CKKSContext, bad) -> None:
    with pytest.raises(InvalidInput):
        ctx.encrypt(bad)


def test_linear_ops(ctx: CKKSContext, xy) -> None:
    x, y = xy
    a, b = ctx.encrypt(x), ctx.encrypt(y)
    assert np.abs(dec(ctx, ctx.add(a, b)) - (x + y)).max() < TOL
    assert np.abs(dec(ctx, ctx.sub(a, b)) - (x - y)).max() < TOL
    assert np.abs(dec(ctx, ctx.negate(a)) + x).max() < TOL
    assert np.abs(dec(ctx, ctx.add_plain(a, y)) - (x + y)).max() < TOL
    assert np.abs(dec(ctx, ctx.add_scalar(a, 0.75)) - (x + 0.75)).max() < TOL
    assert np.abs(dec(ctx, ctx.sub(a, a))).max() < TOL  # SEAL refuses transparent results; we return 0
    # inputs are never mutated
    assert np.abs(dec(ctx, a) - x).max() < TOL and np.abs(dec(ctx, b) - y).max() < TOL


def test_multiplications_and_levels(ctx: CKKSContext, xy) -> None:
    x, y = xy
    a, b = ctx.encrypt(x), ctx.encrypt(y)
    top = ctx.max_level
    ab = ctx.mul(a, b)
    assert ctx.level(ab) == top - 1 and ab.scale == ctx.scale_at(top - 1)
    assert np.abs(dec(ctx, ab) - x * y).max() < TOL
    sq = ctx.square(a)
    assert np.abs(dec(ctx, sq) - x * x).max() < TOL
    mp = ctx.mul_plain(a, y)
    assert ctx.level(mp) == top - 1 and mp.scale == ctx.scale_at(top - 1)
    assert np.abs(dec(ctx, mp) - x * y).max() < TOL
    assert np.abs(dec(ctx, ctx.mul_plain(a, -2.5)) + 2.5 * x).max() < 3 * TOL
    assert np.abs(dec(ctx, ctx.mul_plain(a, 0.0))).max() < TOL
    # lazy rescaling: unrescaled products share a scale, one rescale lands on the canonical scale
    p1, p2 = ctx.mul_plain(a, y, rescale=False), ctx.mul_plain(b, 0.5, rescale=False)
    assert ctx.level(p1) == top
    lazy = ctx.rescale(ctx.add(p1, p2))
    assert lazy.scale == ctx.scale_at(top - 1)
    assert np.abs(dec(ctx, lazy) - (x * y + 0.5 * y)).max() < TOL
    # mixed levels: the deeper operand decides, the other is brought down exactly
    x3 = ctx.mul(ab, a)  # level top-2
    assert ctx.level(x3) == top - 2
    assert np.abs(dec(ctx, x3) - x * x * y).max() < TOL
    mixed = ctx.add(x3, b)
    assert ctx.level(mixed) == top - 2
    assert np.abs(dec(ctx, mixed) - (x * x * y + y)).max() < TOL
    assert np.abs(dec(ctx, ctx.mul(b, x3)) - x * x * y * y).max() < TOL
    ms = ctx.mod_switch_to_level(a, 1)
    assert ctx.level(ms) == 1 and np.abs(dec(ctx, ms) - x).max() < TOL
    with pytest.raises(DepthExhausted):
        ctx.mod_switch_to_level(ms, 2)


def test_rotations(ctx: CKKSContext, xy) -> None:
    x, _ = xy
    a = ctx.encrypt(x)
    full = np.zeros(ctx.slots)
    full[:N_VALS] = x
    for step in (1, -1, 5, 4095, 0):
        got = ctx.decrypt(ctx.rotate(a, step))
        assert np.abs(got - np.roll(full, -step)).max() < TOL
    with pytest.raises(KeyMaterialError, match="rotation step 3"):
        ctx.rotate(a, 3)


def test_scale_mismatch_at_same_level_is_refused(ctx: CKKSContext, xy) -> None:
    x, y = xy
    a = ctx.encrypt(x)
    unrescaled = ctx.mul_plain(a, y, rescale=False)  # scale ~2^80 at the top level
    with pytest.raises(BudgetError, match="scales"):
        ctx.add(unrescaled, ctx.encrypt(y))


def test_depth_exhausted_before_seal_fails(ctx: CKKSContext, xy) -> None:
    x, _ = xy
    ct = ctx.encrypt(x)
    for _ in range(ctx.max_level):
        ct = ctx.square(ct)
    assert ctx.level(ct) == 0
    assert np.abs(dec(ctx, ct) - x**8).max() < TOL
    for op in (ctx.square, lambda c: ctx.mul(c, c), lambda c: ctx.mul_plain(c, 2.0), ctx.rescale):
        with pytest.raises(DepthExhausted):
            op(ct)
    with pytest.raises(DepthExhausted):
        ctx.mul(ct, ctx.encrypt(x))  # aligned down to level 0 first, then refused
    c = ctx.encrypt(x)
    with pytest.raises(DepthExhausted, match="scale"):  # unrescaled products outgrow the modulus
        for _ in range(5):
            c = ctx.mul_plain(c, 1.0, rescale=False)


def test_counters(ctx: CKKSContext, xy) -> None:
    x, y = xy
    a, b = ctx.encrypt(x), ctx.encrypt(y)
    ctx.reset_stats()
    ctx.rotate(ctx.mul(ctx.mul_plain(a, 2.0), ctx.mul_plain(b, 3.0)), 1)
    assert ctx.stats["rotations"] == 1
    assert ctx.stats["ct_ct_mults"] == 1
    assert ctx.stats["ct_pt_mults"] == 2
    assert ctx.stats["rescales"] == 3
    assert ctx.stats["encodes"] == 2
    ctx.reset_stats()
    assert all(v == 0 for v in ctx.stats.values())


def test_encode_cache(ctx: CKKSContext) -> None:
    ctx.reset_stats()
    vals = np.linspace(-1, 1, 50)
    p1 = ctx.encode(vals, 2, ctx.scale_at(2), key=("test", 1))
    p2 = ctx.encode(lambda: 1 / 0, 2, ctx.scale_at(2), key=("test", 1))  # cached: the callable is not called
    assert p1 is p2 and ctx.stats["encodes"] == 1
    ctx.encode(vals, 1, ctx.scale_at(1), key=("test", 1))  # another level: encoded again
    assert ctx.stats["encodes"] == 2


def test_public_context_cannot_decrypt(ctx: CKKSContext, xy) -> None:
    x, y = xy
    pub = ctx.public()
    assert not pub.has_secret_key and pub.fingerprint == ctx.fingerprint
    ct = pub.add(pub.encrypt(x), pub.encrypt(y))  # a server can encrypt and evaluate
    with pytest.raises(KeyMaterialError, match="no secret key"):
        pub.decrypt(ct)
    assert np.abs(dec(ctx, ct) - (x + y)).max() < TOL


def test_precision_bits_is_honoured() -> None:
    p = choose_params(2, precision_bits=20, poly_modulus_degree=8192)
    c = CKKSContext.generate(p)
    x = np.random.default_rng(1).uniform(-1, 1, c.slots)
    out = c.decrypt(c.square(c.square(c.encrypt(x))))
    assert np.abs(out - x**4).max() < 2.0**-20


def test_headroom_for_large_values() -> None:
    p = choose_params(1, max_abs_value=1000.0, poly_modulus_degree=8192)
    c = CKKSContext.generate(p)
    x = np.random.default_rng(2).uniform(-31, 31, 500)  # squares reach ~960 at the last level
    out = c.decrypt(c.square(c.encrypt(x)))[:500]
    assert np.abs(out - x * x).max() < 1e-3


def test_small_scale_mixed_levels_stay_exact() -> None:
    """At scale 2^26 the level scales differ by ~1e-3: mixed-level ops must still match exactly."""
    p = choose_params(3, precision_bits=8, poly_modulus_degree=8192, scale_bits=26)
    c = CKKSContext.generate(p)
    drift = [abs(c.scale_at(lvl) / c.scale - 1) for lvl in range(1, c.max_level + 1)]
    assert max(drift) > 1e-5  # the exact (multiply-by-one) alignment path is exercised
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200)
    a, b = c.encrypt(x), c.encrypt(y)
    x2 = c.square(a)
    x3 = c.mul(x2, a)
    out = c.add(c.sub(x3, b), c.mul_plain(x2, 0.5))
    assert c.level(out) == c.max_level - 2
    assert np.abs(c.decrypt(out)[:200] - (x**3 - y + 0.5 * x * x)).max() < 1e-2


# ---------------------------------------------------------------------------------------------- serialization


def test_context_and_ciphertext_round_trip(ctx: CKKSContext, xy) -> None:
    x, y = xy
    pub = serialize.load_context(serialize.dump_context(ctx))
    assert not pub.has_secret_key
    assert pub.params == ctx.params and pub.rotation_steps == ctx.rotation_steps
    assert pub.fingerprint == ctx.fingerprint
    cts = serialize.load_ciphertexts(pub, serialize.dump_ciphertexts(ctx, [ctx.encrypt(x), ctx.encrypt(y)]))
    res = pub.rotate(pub.mul(cts[0], cts[1]), 1)
    back = serialize.load_ciphertexts(ctx, serialize.dump_ciphertexts(pub, [res]))[0]
    assert np.abs(dec(ctx, back, N_VALS - 1) - (x * y)[1:]).max() < TOL
    full = serialize.load_context(serialize.dump_context(ctx, include_secret=True))
    assert full.has_secret_key
    assert np.abs(dec(full, back, N_VALS - 1) - (x * y)[1:]).max() < TOL
    with pytest.raises(KeyMaterialError):
        serialize.dump_context(pub, include_secret=True)


def test_public_dump_holds_no_secret_key(ctx: CKKSContext) -> None:
    public = serialize.dump_context(ctx)
    sk = seal_to_bytes(ctx.keys.secret_key)
    windows = [sk[i : i + 64] for i in range(64, len(sk) - 64, max(1, (len(sk) - 128) // 16))]
    assert len(windows) >= 16
    assert not any(w in public for w in windows)
    with_secret = serialize.dump_context(ctx, include_secret=True)  # positive control
    assert all(w in with_secret for w in windows)


def test_public_context_in_a_fresh_process_cannot_decrypt(ctx: CKKSContext, xy, tmp_path) -> None:
    x, y = xy
    (tmp_path / "ctx.bin").write_bytes(serialize.dump_context(ctx))
    (tmp_path / "in.bin").write_bytes(serialize.dump_ciphertexts(ctx, [ctx.encrypt(x), ctx.encrypt(y)]))
    script = textwrap.dedent(
        f"""
        import pathlib
        from privml.errors import KeyMaterialError
        from privml.he import serialize
        d = pathlib.Path({str(tmp_path)!r})
        ctx = serialize.load_context((d / "ctx.bin").read_bytes())
        a, b = serialize.load_ciphertexts(ctx, (d / "in.bin").read_bytes())
        out = ctx.add(ctx.mul(a, b), b)
        (d / "out.bin").write_bytes(serialize.dump_ciphertexts(ctx, [out]))
        try:
            ctx.decrypt(out)
            print("DECRYPTED")
        except KeyMaterialError as exc:
            print("REFUSED", ctx.has_secret_key, exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "REFUSED False" in res.stdout and "DECRYPTED" not in res.stdout
    out = serialize.load_ciphertexts(ctx, (tmp_path / "out.bin").read_bytes())[0]
    assert np.abs(dec(ctx, out) - (x * y + y)).max() < TOL


def test_insecure_context_loads_only_when_allowed() -> None:
    from privml.he.params import CKKSParams

    weak = CKKSContext.generate(CKKSParams(8192, (60, 40, 40, 60, 60), 40, allow_insecure=True))
    blob = serialize.dump_context(weak)
    with pytest.raises(MalformedInput, match="below 128-bit"):
        serialize.load_context(blob)
    assert serialize.load_context(blob, allow_insecure=True).params.security_bits == 0


def test_bad_bytes_are_refused(ctx: CKKSContext, xy) -> None:
    x, _ = xy
    blob = serialize.dump_ciphertexts(ctx, [ctx.encrypt(x)])
    for cut in (0, 7, 47, 48, 100, len(blob) // 2, len(blob) - 1):
        with pytest.raises(MalformedInput):
            serialize.load_ciphertexts(ctx, blob[:cut])
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0x10
    with pytest.raises(MalformedInput, match="checksum"):
        serialize.load_ciphertexts(ctx, bytes(flipped))
    wrong_version = bytearray(blob)
    wrong_version[8] = 99
    with pytest.raises(MalformedInput, match="version"):
        serialize.load_ciphertexts(ctx, bytes(wrong_version))
    with pytest.raises(MalformedInput):
        serialize.load_context(blob)  # a ciphertext blob is not a context
    with pytest.raises(MalformedInput):
        serialize.load_ciphertexts(ctx, "not bytes")
    other = CKKSContext.generate(ctx.params)  # same parameters, different keys
    with pytest.raises(KeyMaterialError, match="different key set"):
        serialize.load_ciphertexts(other, blob)
    ctx_blob = serialize.dump_context(ctx)
    for cut in (10, len(ctx_blob) // 2):
        with pytest.raises(MalformedInput):
            serialize.load_context(ctx_blob[:cut])


def test_context_sizes_only_needed_galois_keys(ctx: CKKSContext) -> None:
    needed = len(serialize.dump_context(ctx))  # 3 rotation steps
    none = len(serialize.dump_context(CKKSContext.generate(ctx.params)))
    assert none < needed < 4 * none  # each Galois key costs about as much as the relinearization key
