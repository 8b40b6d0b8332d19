"""``privml.Session``: the explicit holder of keys / parties / enclave for one plan (no global state).

The session is the client: it trusts its own configuration, not the plan it received. It re-checks the plan's
schema, recomputes the CKKS security level from the parameters it is about to generate keys for, checks inputs
against the calibrated input range before encrypting and every decrypted sample against the output window.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from privml.backends import load_backend
from privml.compiler.api import check_input
from privml.compiler.client import apply_client_ops
from privml.compiler.plan import Plan
from privml.config import SessionConfig, session_config
from privml.errors import InvalidInput, KeyMaterialError, MalformedInput, MemoryLimitExceeded, RangeViolation
from privml.tensor import PrivateTensor

_UNSET = object()
MIN_SECURITY_BITS = 128


class SampleRangeViolation(RangeViolation):
    """Some samples of a batch left their calibrated range; the others are usable.

    ``indices``: the flagged samples (batch positions); ``amounts``: how far each one lies outside the window
    (same units as the data); ``valid_indices`` and ``values``: the other samples and their rows (the inputs for
    ``encrypt``, the decrypted outputs, client ops applied, for ``decrypt``).
    """

    def __init__(self, message: str, indices: list[int], amounts: list[float], valid_indices: list[int],
                 values: torch.Tensor) -> None:
        super().__init__(message)
        self.indices = indices
        self.amounts = amounts
        self.valid_indices = valid_indices
        self.values = values


class RangeWarning(UserWarning):
    """``out_of_range="warn"``: samples outside their calibrated range were kept (``session.last_out_of_range``)."""


class Session:
    """Encrypts inputs and decrypts outputs for models compiled with ``plan``.

    Options are typed (:mod:`privml.config`): ``config=MPCSessionConfig(parties=3)`` or the same as
    keywords (``parties=3``); ``range_slack`` and ``out_of_range`` for every backend, ``allow_insecure`` for
    CKKS, the rest go to the backend (e.g. ``simulation="ckks"`` for plain). An unknown name is refused with
    the closest valid one. ``last_out_of_range`` lists the samples the last ``encrypt``/``decrypt`` flagged.
    """

    def __init__(self, plan: Plan, range_slack: Any = _UNSET, *, config: SessionConfig | None = None,
                 keys: Any = None, **options: Any) -> None:
        if not isinstance(plan, Plan):
            raise InvalidInput(f"privml: Session needs a Plan (compiled.plan), got {type(plan).__name__}")
        if range_slack is not _UNSET:  # positional, as before the typed configurations
            options["range_slack"] = range_slack
        self.config = session_config(plan.backend, config, **options)
        plan.check()
        self.security_bits: int | None = None
        if plan.backend in ("ckks", "hybrid"):
            plan = self._secure_ckks_plan(plan)
        self.plan = plan
        self.range_slack = self.config.range_slack
        self.last_out_of_range: list[int] = []
        cache = self._memory_budget(plan)
        backend_options = self.config.backend_options()
        if cache is not None and plan.backend == "hybrid":  # the backend encodes with its cache size at provisioning
            backend_options["plaintext_cache_gb"] = min(cache / 1e9, self.config.plaintext_cache_gb)
        if keys is not None:  # a CKKSContext with its secret key (Session.from_keys)
            if plan.backend != "ckks":
                raise InvalidInput(f"privml: saved keys are for CKKS sessions; a {plan.backend} session makes its "
                                   "own (hybrid keys are provisioned to the enclave afresh for every session)")
            backend_options["context"] = keys
        self.backend = load_backend(plan.backend).make_backend(plan, **backend_options)
        if cache is not None and plan.backend == "ckks":
            self.backend.ctx.cache_bytes = cache

    @classmethod
    def from_keys(cls, plan: Plan, path: str | Path, *, password: str | bytes | None = None,
                  key_file: str | Path | None = None, **options: Any) -> Session:
        """A CKKS session on the keys :meth:`save_keys` sealed at ``path`` (same password or key file): a client
        that restarts keeps its keys, so a server holding its evaluation keys need not get them again."""
        from privml import keystore
        from privml.he.serialize import load_context

        blob = Path(path).read_bytes()
        data = keystore.unseal(blob, password=password, key_file=key_file)
        allow = bool(options.get("allow_insecure", False))
        return cls(plan, keys=load_context(data, allow_insecure=allow), **options)

    def save_keys(self, path: str | Path, *, password: str | bytes | None = None,
                  key_file: str | Path | None = None) -> Path:
        """Write this CKKS session's keys (secret key included) to ``path``, sealed: AES-256-GCM under a key
        derived from ``password`` (scrypt) or ``key_file`` (HKDF; :func:`privml.keystore.new_key_file`).
        The file is created with mode 0600; the secret key is never written in clear."""
        from privml import keystore
        from privml.he.serialize import dump_context

        if self.plan.backend != "ckks":
            raise InvalidInput(f"privml: save_keys is for CKKS sessions, this one is {self.plan.backend}")
        blob = keystore.seal(dump_context(self.backend.ctx, include_secret=True), password=password,
                             key_file=key_file)
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return path

    def _memory_budget(self, plan: Plan) -> int | None:
        """Plaintext cache bytes that keep the session within ``memory_limit`` (None: no limit, keep the default).

        Keys and live ciphertexts are recomputed here from the parameters and the plan's counts; when they alone
        (plus the process itself) exceed the limit the session is refused before any key is generated."""
        limit = getattr(self.config, "memory_limit", None)
        if limit is None:
            return None
        from privml.he import memory
        from privml.he.params import CKKSParams

        mem = plan.params.get("memory_gb")
        if not isinstance(mem, dict):
            raise MemoryLimitExceeded("privml: memory_limit= needs a plan with a memory prediction "
                                      "(plan.params['memory_gb']): recompile the model with this version")
        try:
            cts_gb, pts_gb = float(mem.get("ciphertexts", 0)), float(mem.get("plaintexts", 0))
        except (TypeError, ValueError):
            raise MalformedInput("privml: the plan's memory_gb holds non-numbers") from None
        if not (0 <= cts_gb < 1e6 and 0 <= pts_gb < 1e6):
            raise MalformedInput(f"privml: implausible memory prediction in the plan: {mem}")
        params = CKKSParams.from_dict(plan.params["ckks"])
        keys = memory.key_bytes(params, len(plan.params.get("rotation_steps", [])))
        fixed = keys + int(cts_gb * 1e9) + memory.PROCESS_BASE_BYTES
        enclave = ""
        if plan.backend == "hybrid" and getattr(self.config, "enclave", None) is None:  # the session launches it
            own = memory.enclave_bytes(params)
            fixed += own
            enclave = f", its enclave process {own / 1e9:.2f} GB"
        plaintexts = int(pts_gb * 1e9)
        if fixed > limit * 1e9:
            raise MemoryLimitExceeded(
                f"privml: this plan needs about {fixed / 1e9:.2f} GB before caching any weight (keys "
                f"{keys / 1e9:.2f} GB, ciphertexts {cts_gb:.2f} GB, process "
                f"{memory.PROCESS_BASE_BYTES / 1e9:.2f} GB{enclave}), over memory_limit={limit:g} GB: raise the "
                "limit, or recompile with a smaller ring or fewer keys (lower precision_bits, max_context_mb=)"
                + (", or fewer levels between refreshes (refresh_depth=)" if plan.backend == "hybrid" else ""))
        room = int(limit * 1e9) - fixed
        if plaintexts > room:
            warnings.warn(f"privml: the plan's encoded diagonals ({plaintexts / 1e9:.2f} GB) do not fit "
                          f"memory_limit={limit:g} GB with its keys and ciphertexts: {room / 1e9:.2f} GB of them "
                          "stay cached, the rest are re-encoded on every call (slower)", UserWarning,
                          stacklevel=3)
        return room

    def _secure_ckks_plan(self, plan: Plan) -> Plan:
        """The plan with ``allow_insecure`` set by this session, after recomputing the security level.

        The plan's own ``allow_insecure`` and ``security_bits`` are claims of whoever sent it: ignored.
        """
        from privml.he.params import HE_STANDARD_128, CKKSParams

        ck = dict(plan.params["ckks"])
        asked = ck.pop("allow_insecure", False) is not False
        params = CKKSParams(ck["poly_modulus_degree"], tuple(ck["coeff_mod_bit_sizes"]), ck["scale_bits"])
        self.security_bits = params.security_bits
        allowed = bool(getattr(self.config, "allow_insecure", False))
        if self.security_bits < MIN_SECURITY_BITS and not allowed:
            claim = plan.params.get("security_bits")
            limit = HE_STANDARD_128[params.poly_modulus_degree]
            raise KeyMaterialError(
                f"privml: refusing to generate keys: N={params.poly_modulus_degree} with a {params.total_bits}-bit "
                f"modulus {list(params.coeff_mod_bit_sizes)} is below {MIN_SECURITY_BITS}-bit security (the HE "
                f"standard allows at most {limit} bits at this N)"
                + (f"; the plan claims {claim} bits" if claim is not None else "")
                + ("; the plan asks for allow_insecure, which a session ignores: only the client's own "
                   "configuration can allow it" if asked else "")
                + ". Recompile, or for experiments only pass allow_insecure=True to privml.Session.")
        lo, hi = plan.params["output_range"]
        floor = int(plan.params.get("hybrid", {}).get("floor", 0)) if plan.backend == "hybrid" else 0
        max_value = 2.0 ** (sum(params.coeff_mod_bit_sizes[:floor + 1]) - params.scale_bits - 1)
        if max(abs(lo), abs(hi)) > max_value:
            raise MalformedInput(
                f"privml: the plan's output range [{lo:.4g}, {hi:.4g}] exceeds what its CKKS parameters can decode "
                f"(|value| <= {max_value:.4g}): wrapped-around results would pass the decrypt check. "
                "Recompile the model; a session does not accept such a plan.")
        ck["allow_insecure"] = allowed and self.security_bits < MIN_SECURITY_BITS
        if plan.backend == "hybrid":
            self._check_hybrid(plan, params)
        return dataclasses.replace(plan, params={**plan.params, "ckks": ck, "security_bits": self.security_bits})

    def _check_hybrid(self, plan: Plan, params: Any) -> None:
        """The flooding and blinding a hybrid plan asks for, checked against what this client computes itself.

        The enclave floods with the sigma the client provisions and the server blinds with the plan's masks, so a
        plan with a tiny ``flood_sigma`` or ``mask_bits`` would switch the protections off: refused.
        """
        from privml.he.noise import NoiseModel, flood_factor

        hy, cfg = plan.params["hybrid"], self.config

        def refuse(why: str) -> None:
            raise MalformedInput(f"privml: refusing this hybrid plan: {why}. Recompile the model; a session does not "
                                 "weaken its own flooding or blinding for a plan.")

        if hy["flood_security_bits"] < cfg.min_flood_security_bits:
            refuse(f"flooding at s={hy['flood_security_bits']} bits, below this session's "
                   f"{cfg.min_flood_security_bits}")
        if hy["mask_bits"] < cfg.min_mask_bits or hy["relu_mask_bits"] < cfg.min_relu_mask_bits:
            refuse(f"masks of {hy['mask_bits']} / {hy['relu_mask_bits']} bits, below this session's "
                   f"{cfg.min_mask_bits} / {cfg.min_relu_mask_bits} (min_mask_bits / min_relu_mask_bits)")
        noise = NoiseModel(params.poly_modulus_degree, params.scale_bits, len(params.coeff_mod_bit_sizes) - 1)
        if hy["noise_bound"] < noise.rs * (1 - 1e-9):
            refuse(f"a noise bound of {hy['noise_bound']:.3g}, below one rescale's {noise.rs:.3g}")
        factor = flood_factor(params.poly_modulus_degree, int(hy["decryption_budget"]), int(hy["flood_security_bits"]))
        flooding = hy.get("flooding", "refresh")
        if flooding not in ("refresh", "release"):
            refuse(f"unknown flooding mode {flooding!r}")
        if flooding == "release" and cfg.require_refresh_flooding:
            refuse("its refreshes are not flooded (flooding='release') and this session has "
                   "require_refresh_flooding=True")
        if flooding == "refresh" and hy["flood_sigma"] < factor * hy["noise_bound"] * (1 - 1e-6):
            refuse(f"flood_sigma {hy['flood_sigma']:.3g} is below sqrt(24 N alpha) 2^(s/2) x the noise bound "
                   f"= {factor * hy['noise_bound']:.3g}")
        if flooding == "release" and (hy["flood_sigma"] < hy["noise_bound"] * (1 - 1e-6) or hy["release_sigma"]
                                      < factor * max(hy["output_noise_bound"], hy["noise_bound"]) * (1 - 1e-6)):
            refuse(f"release flooding of sigma {hy['release_sigma']:.3g} is below sqrt(24 N alpha) 2^(s/2) x the "
                   f"carried output noise bound {hy['output_noise_bound']:.3g}")
        if hy["release_sigma"] < factor * noise.rs * (1 - 1e-6):
            refuse(f"release_sigma {hy['release_sigma']:.3g} is below the flooding of one rescale's noise "
                   f"({factor * noise.rs:.3g})")
        ranges = [plan.params["output_range"], plan.params.get("input_range") or [0.0, 0.0]]
        largest = max(abs(float(v)) for r in ranges for v in r)
        if hy["value_bound"] < largest:
            refuse(f"value_bound {hy['value_bound']:.3g} is below the plan's own ranges (|values| up to "
                   f"{largest:.3g}): masks sized from it would not hide the values")

    def encrypt(self, x: torch.Tensor) -> PrivateTensor:
        """A private tensor holding ``x`` (batch first, shaped like the calibration samples).

        Samples outside the plan's calibrated input range (``plan.params["input_range"]``) would be computed on
        polynomials outside their interval: ``SampleRangeViolation`` names them (``out_of_range="warn"``: a
        ``RangeWarning``, and they are encrypted anyway).
        """
        check_input(x, self.plan.input_shape)
        if x.shape[0] == 0:
            raise InvalidInput("privml: cannot encrypt an empty batch (0 samples)")
        x = x.detach()
        rng = self.plan.params.get("input_range")
        self.last_out_of_range = []
        if rng is not None:
            excess = _excess(x, float(rng[0]), float(rng[1]))
            self._flag(excess, x, "inputs", f"the calibrated input range [{rng[0]:.4g}, {rng[1]:.4g}]",
                       "the model's approximations were fitted for calibration-like inputs only. Recompile with "
                       "calibration data covering these inputs, or encrypt only `err.values`.")
        return self.backend.encrypt(x)

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> Session:
        """Bring the backend's long-lived parts up now (MPC: start the party processes once and keep them for every
        later call, instead of launching them per call); ``with Session(...) as s:`` does it too."""
        start = getattr(self.backend, "start", None)
        if start is not None:
            start()
        return self

    def close(self) -> None:
        """Release what the backend holds (the hybrid backend: its enclave connection and any enclave it started)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def decrypt(self, t: PrivateTensor, release: bool | None = None) -> torch.Tensor:
        """The clear value of a private tensor produced under this session, checked sample by sample.

        ``release=True`` (hybrid; or the session's ``release`` option) floods the decrypted values first
        (:mod:`privml.he.noise`), for outputs that will be shown to others (IND-CPA-D).

        Samples outside the output window (see ``check_output_range``) raise ``SampleRangeViolation``
        carrying the other samples' outputs (``.values``); with ``out_of_range="warn"`` all are returned
        with a ``RangeWarning`` and the flagged ones listed in ``session.last_out_of_range``.
        """
        if not isinstance(t, PrivateTensor):
            raise InvalidInput(f"privml: decrypt needs a private tensor, got {type(t).__name__}")
        if type(t).backend_name != self.plan.backend:
            raise InvalidInput(f"privml: cannot decrypt a {type(t).backend_name} tensor in a {self.plan.backend} "
                               "session")
        if release is not None and self.plan.backend != "hybrid":
            raise InvalidInput("privml: release flooding needs a hybrid plan (its noise bounds size the flooding); "
                               f"this session is {self.plan.backend}")
        out = self.backend.decrypt(t, release=release) if release is not None else self.backend.decrypt(t)
        excess = self.output_excess(out)
        result = apply_client_ops(out, self.plan.params.get("client_ops", []))
        self.last_out_of_range = []
        if excess is not None:
            lo, hi = self._output_window()
            self._flag(excess, result, "decrypted outputs", f"the output window [{lo:.4g}, {hi:.4g}] (the "
                       f"calibrated output range widened by range_slack={self.range_slack})",
                       "an intermediate value probably left the interval its approximation or encoding was "
                       "planned for, so these numbers cannot be trusted. Recompile with calibration data that "
                       "covers these inputs (or a larger margin).")
        return result

    def check_output_range(self, out: torch.Tensor) -> None:
        """Raise ``SampleRangeViolation`` if decrypted values fall far outside the calibrated output range.

        Encrypted backends fail silently: an intermediate value leaving its polynomial's interval, or a
        CKKS value wrapping around its modulus, shows up as outputs far from anything seen in calibration.
        The window is the calibrated range widened by ``range_slack`` times its half-width on each side
        (``range_slack=None`` disables the check; a plan cannot).
        """
        excess = self.output_excess(out)
        if excess is not None:
            lo, hi = self._output_window()
            self._flag(excess, out, "decrypted outputs", f"the output window [{lo:.4g}, {hi:.4g}]",
                       "These numbers cannot be trusted.", mode="raise")

    def output_excess(self, out: torch.Tensor) -> torch.Tensor | None:
        """Per sample, how far its decrypted values lie outside the output window (0 inside; None: no check)."""
        if self.range_slack is None or out.dim() == 0 or out.shape[-1:] == (0,) or out.numel() == 0:
            return None
        if self.plan.params.get("output_range") is None:
            return None  # plain backend only: Plan.check requires an output range for encrypted ones
        lo, hi = self._output_window()
        return _excess(out, lo, hi)

    def _output_window(self) -> tuple[float, float]:
        lo, hi = (float(v) for v in self.plan.params["output_range"])
        center, half = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
        width = half * (1 + float(self.range_slack or 0.0))
        return center - width, center + width

    def _flag(self, excess: torch.Tensor, values: torch.Tensor, what: str, window: str, why: str,
              mode: str | None = None) -> None:
        """Raise (or warn about) the samples with ``excess > 0``, naming each index and its distance."""
        bad = [i for i, e in enumerate(excess.tolist()) if not e <= 0]  # NaN counts as outside
        if not bad:
            return
        amounts = [float(excess[i]) for i in bad]
        shown = ", ".join(f"{i} (by {a:.3g})" for i, a in zip(bad[:10], amounts[:10], strict=True))
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        message = (f"privml: {len(bad)} of {len(excess)} samples have {what} outside {window}: sample {shown}{more}. "
                   f"{why}").rstrip()
        self.last_out_of_range = bad
        if (mode or self.config.out_of_range) == "warn":
            warnings.warn(message + " (out_of_range='warn': kept)", RangeWarning, stacklevel=3)
            return
        valid = [i for i in range(len(excess)) if i not in set(bad)]
        raise SampleRangeViolation(message + " The other samples are in `err.values` (`err.valid_indices`).",
                                   bad, amounts, valid, values[valid])


def _excess(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per sample (first dim), the largest distance of its values below ``lo`` or above ``hi`` (0 when inside)."""
    flat = x.detach().reshape(x.shape[0], -1).double()
    if flat.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    below, above = (lo - flat).amax(dim=1), (flat - hi).amax(dim=1)
    worst = torch.maximum(below, above).clamp(min=0)
    return torch.where(torch.isfinite(flat).all(dim=1), worst, torch.full_like(worst, float("nan")))

