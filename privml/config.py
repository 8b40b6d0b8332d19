"""Typed configurations for ``privml.compile`` and ``privml.Session`` (modelled on torchao's configs).

Every option is declared once, here: its type, its default and a one-line help text
(``field(metadata={"help": ...})``). ``privml.compile(model, calib, backend="ckks", max_error=0.05)``
is shorthand for ``privml.compile(model, calib, config=CKKSConfig(max_error=0.05))``; an unknown
option name is refused with the closest valid one. ``CONFIGS`` is the one declaration of the
backends: adding a backend is adding its config class there.

Low layer: imports only ``privml.errors``, the standard library and torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from privml.errors import InvalidInput

SIMULATION_MODES = ("none", "ckks", "fixed_point")
OUT_OF_RANGE_MODES = ("raise", "warn")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A config field: ``default``, one line of ``help``; ``min`` (inclusive), ``max``, ``choices`` are checked,
    ``choose=True`` marks options passed on to the approximation pass, ``cli=False`` keeps it off the CLI."""
    compare = meta.pop("compare", True)
    return field(default=default, compare=compare, metadata={"help": help, **meta})


def alternatives(hint: Any) -> tuple[Any, ...]:
    """The types a field's annotation allows (``int | None`` -> ``(int, NoneType)``)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type ``tp`` (ints are not bools; floats are finite)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return len(value) > 0 and all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    return isinstance(value, tp)


_TYPE_NAMES = {type(None): "None", bool: "True or False", int: "an integer", float: "a finite number",
               str: "a string"}


def _type_name(hint: Any) -> str:
    """``int | None`` -> "an integer or None", for error messages."""
    return " or ".join(_TYPE_NAMES.get(tp, str(tp).replace("typing.", "")) for tp in alternatives(hint))


class _Config:
    """Shared behaviour of compile and session configs: checks, keyword constructor, field listing."""

    backend: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON gives lists; configs hold tuples (hashable, frozen)
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            hint = hints[f.name]
            if not any(_matches(value, tp) for tp in alternatives(hint)):
                raise InvalidInput(f"privml: {f.name} must be {_type_name(hint)}, got {value!r}")
            if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
                if "choices" in f.metadata and isinstance(value, str) and value not in f.metadata["choices"]:
                    raise InvalidInput(f"privml: {f.name} must be one of {f.metadata['choices']}, got {value!r}")
                continue
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise InvalidInput(f"privml: {f.name} must be {bounds}, got {value!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    @classmethod
    def check_keys(cls, options: dict[str, Any]) -> None:
        """Refuse option names this config does not declare, naming the closest valid one."""
        names = cls.option_names()
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid options: {', '.join(names)}"
                raise InvalidInput(f"privml: unknown option {key!r} for backend {cls.backend!r}{hint}")

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        """The config from keyword options (the ``privml.compile(..., **options)`` shorthand)."""
        cls.check_keys(options)
        return cls(**options)

    def replace(self, **options: Any) -> Any:
        """A copy with ``options`` changed (checked like the constructor)."""
        self.check_keys(options)
        return dataclasses.replace(self, **options)  # type: ignore[type-var]

    def options(self) -> dict[str, Any]:
        """Every option by name, as held."""
        return {name: getattr(self, name) for name in self.option_names()}


# ---------------------------------------------------------------------------------------------------------------
# compile configs


@dataclass(frozen=True)
class CompileConfig(_Config):
    """Options of ``privml.compile`` every backend takes: model fixes and the approximation pass.

    The approximation pass runs for CKKS always and for MPC when a budget (``max_error``,
    ``accuracy_tolerance``) is given or an activation has no exact MPC form; see
    :mod:`privml.compiler.choose`. Without a budget or ``degree`` it meets ``agreement_target``.
    """

    replace_maxpool: bool = option(False, "replace MaxPool2d by AvgPool2d (lossy); otherwise MaxPool is refused")
    max_error: float | None = option(None, "budget: max approximation error per activation on its interval",
                                     min=0, choose=True)
    accuracy_tolerance: float | None = option(None, "budget: allowed accuracy drop on validation=(x, y), "
                                              "e.g. 0.01 = one point", min=0, choose=True)
    validation: tuple[torch.Tensor, torch.Tensor] | None = option(
        None, "labelled inputs (x, y) for accuracy_tolerance and simulate_noise (stored by size only)",
        choose=True, cli=False, compare=False)
    depth_budget: int | None = option(None, "budget: total multiplicative depth (CKKS)", min=0, choose=True)
    degree: int | None = option(None, "one polynomial degree for every approximated activation "
                                "(default: chosen to meet agreement_target)", min=1, max=63, choose=True)
    agreement_target: float = option(0.99, "without a budget or degree: fraction of calibration samples on which "
                                     "the approximated model's argmax must equal the original's (else a "
                                     "FidelityWarning)", min=0, max=1, choose=True)
    margin: float = option(0.1, "widen each calibrated interval by this fraction of its width", min=0, choose=True)
    percentile: bool | tuple[float, float] | None = option(
        None, "percentile ranges instead of min/max: true for (0.1, 99.9), or (low, high) in percent", choose=True)
    max_degree: int = option(31, "highest direct polynomial degree the pass considers", min=1, choose=True)
    composites: bool = option(True, "also consider sign composites (x * (1 + sign(x)) / 2) for ReLU", choose=True)
    trainable: bool = option(False, "trainable polynomial coefficients (for privml.train.finetune)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validation is not None and len(self.validation) != 2:
            raise InvalidInput(f"privml: validation must be a pair (x, y), got {len(self.validation)} items")

    @property
    def has_budget(self) -> bool:
        return any(v is not None for v in (self.max_error, self.accuracy_tolerance, self.depth_budget))

    @property
    def approximates(self) -> bool:
        """Whether compile runs the approximation pass for this config (the backend's classes decide)."""
        return False

    def choose_options(self) -> dict[str, Any]:
        """Keyword arguments for ``choose``: the set ``choose`` options (``agreement_target`` only without a
        budget or degree, the only case it decides)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("choose")}
        out = {k: v for k, v in out.items() if v is not None}
        if self.degree is not None or self.has_budget:
            out.pop("agreement_target", None)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form with its type, as a plan stores it (validation data by its size only)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for name, value in self.options().items():
            if name == "validation" and value is not None:
                x = value[0]
                value = {"samples": int(x.shape[0])} if isinstance(x, torch.Tensor) else "given"
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class PlainConfig(CompileConfig):
    """``privml.compile(..., backend="plain")``: the clear reference (no approximation pass today)."""

    backend: ClassVar[str] = "plain"


def _fusion_option() -> Any:
    """The ``fusion`` option of the CKKS and hybrid configs (one declaration, a field for each)."""
    return option("auto", "where two position-mixing linear maps meet (a pooling before a conv): auto (fuse or "
                  "apply apart by predicted seconds; the plan's fusion table), always, never",
                  choices=("auto", "always", "never"))


@dataclass(frozen=True)
class CKKSConfig(CompileConfig):
    """``privml.compile(..., backend="ckks")``: approximation, packing layout and CKKS parameters."""

    backend: ClassVar[str] = "ckks"

    layout: str = option("latency", "packing: latency (one sample per ciphertext) or throughput (one per slot)",
                         choices=("latency", "throughput"))
    precision_bits: int = option(20, "fractional bits of precision the CKKS parameters must keep", min=1,
                                 choose=True)
    poly_modulus_degree: int | None = option(None, "ring dimension N (default: the smallest that fits)", min=1,
                                             choose=True)
    scale_bits: int | None = option(None, "CKKS scale in bits (default: from precision_bits)", min=1)
    coeff_mod_bit_sizes: tuple[int, ...] | None = option(None, "explicit modulus chain in bits, e.g. 60,40,40,60")
    input_expansion: bool = option(True, "latency layout: expand the input so the first layer needs fewer keys")
    batch_size: int | None = option(None, "throughput layout: largest batch to pack for; below half the slots a "
                                    "ciphertext holds several features (default: one feature per ciphertext; "
                                    "privml eval: its --batch-size)", min=1, cli=False)
    rotation_keys: str = option("auto", "Galois keys: auto (fewest key switches plus keys), direct (one per "
                                "rotation step) or few (unit and giant steps, the rest by repeated rotation)",
                                choices=("auto", "direct", "few"))
    max_context_mb: float | None = option(None, "cap on the public context (MB): fewer Galois keys, missing "
                                          "rotations composed from the rest (default: up to 4 log2 N keys)", min=1)
    fusion: str = _fusion_option()
    fold: bool = option(True, "latency layout: sum a narrower map's output copies by rotate-and-add (fewer "
                        "products and key switches) where the planner can bound what that leaves outside the "
                        "outputs; the plan's folded/no_fold lists say where")
    simulate_noise: bool = option(False, "with validation: also predict accuracy under simulated CKKS noise")

    @property
    def approximates(self) -> bool:
        return True  # every non-polynomial activation must become a polynomial


@dataclass(frozen=True)
class MPCConfig(CompileConfig):
    """``privml.compile(..., backend="mpc")``: exact ReLU by default; approximations only with a budget."""

    backend: ClassVar[str] = "mpc"

    link_delay_ms: float | None = option(None, "one-way delay of the parties' link (ms): with a budget, each "
                                         "activation takes exact ReLU or a polynomial by predicted seconds on it; "
                                         "the plan predicts a request's latency there", min=0, choose=True)
    link_mbit: float | None = option(None, "bandwidth of the parties' link (Mbit/s; None: unlimited)", min=0,
                                     choose=True)

    @property
    def approximates(self) -> bool:
        return self.has_budget


@dataclass(frozen=True)
class HybridConfig(CompileConfig):
    """``privml.compile(..., backend="hybrid")``: CKKS on the server, an attested enclave refreshing ciphertexts.

    The enclave holds the secret key and refreshes ciphertexts that ran out of levels (decrypt, flood, re-encrypt
    at the top level) instead of bootstrapping; with ``enclave_activations`` it also applies ReLU exactly to
    positively masked values during a refresh. The planner picks the ring (N = 8192 or 16384), the scale and
    the levels between refreshes under the flooding cost (:mod:`privml.he.noise`).
    """

    backend: ClassVar[str] = "hybrid"

    layout: str = option("latency", "packing: latency (one sample per ciphertext) or throughput (one per slot)",
                         choices=("latency", "throughput"))
    poly_modulus_degree: int | None = option(None, "ring dimension N (default: the cheapest of 8192 and 16384 "
                                             "that keeps the flooded precision)", choices=(8192, 16384, None))
    enclave_activations: bool = option(True, "ReLU evaluated exactly by the enclave on positively masked values "
                                       "(it learns each value's sign); False: polynomial ReLU, pure refreshes",
                                       choose=True)
    refresh_depth: int | None = option(None, "levels between two refreshes (default: chosen by the planner)",
                                       min=1, choose=True)
    decryption_budget: int = option(64, "ciphertexts the enclave may decrypt per key (alpha of the "
                                    "flooding bound; the enclave refuses more)", min=1)
    flood_security_bits: int = option(30, "statistical security s of the noise flooding (>= 30)", min=30)
    flooding: str = option("auto", "where the LMSS flooding goes: refresh (the enclave floods every refresh), "
                           "release (refreshes carry their noise; outputs decrypted with release=True are flooded "
                           "for the carried total), auto (refresh when that keeps the output tolerance, else release)",
                           choices=("auto", "refresh", "release"))
    mask_bits: int = option(20, "additive blinding of a pure refresh: masks 2^mask_bits x the value bound "
                            "(statistical distance 2^-mask_bits)", min=1, max=40)
    relu_mask_bits: int = option(2, "exact ReLU: positive per-slot masks in [1, 2^relu_mask_bits] (hide each "
                                 "value's magnitude within that factor; flooding grows with it)", min=0, max=16)
    max_output_error: float | None = option(None, "largest predicted output error (6 sigma of the flooding) the "
                                            "plan may have (default: a hundredth of the calibrated output range)",
                                            min=0)
    fusion: str = _fusion_option()

    @property
    def approximates(self) -> bool:
        return not self.enclave_activations


# ---------------------------------------------------------------------------------------------------------------
# session configs


@dataclass(frozen=True)
class SessionConfig(_Config):
    """Options of ``privml.Session`` every backend takes."""

    range_slack: float | None = option(3.0, "refuse decrypted outputs beyond (1 + slack) x the calibrated "
                                       "half-width from its center (None: no check)", min=0)
    out_of_range: str = option("raise", "samples outside the calibrated input range (encrypt) or output window "
                               "(decrypt): raise RangeViolation naming them, or warn and keep them",
                               choices=OUT_OF_RANGE_MODES)

    session_only: ClassVar[tuple[str, ...]] = ()  # backend-specific options the session itself applies

    def backend_options(self) -> dict[str, Any]:
        """The options the backend's ``make_backend`` takes (all but the session's own)."""
        own = {f.name for f in fields(SessionConfig)} | set(self.session_only)
        return {k: v for k, v in self.options().items() if k not in own}


@dataclass(frozen=True)
class PlainSessionConfig(SessionConfig):
    backend: ClassVar[str] = "plain"

    simulation: Any = option(None, "mimic an encrypted backend: none, ckks (noise) or fixed_point, or a "
                             "privml.backends.plain.Simulation", choices=SIMULATION_MODES)


@dataclass(frozen=True)
class CKKSSessionConfig(SessionConfig):
    backend: ClassVar[str] = "ckks"
    session_only: ClassVar[tuple[str, ...]] = ("allow_insecure", "memory_limit")

    allow_insecure: bool = option(False, "generate keys for parameters below 128-bit security (experiments only; "
                                  "the client's decision: a plan asking for it is ignored)")
    memory_limit: float | None = option(None, "GB this session may use: a plan predicted to need more is refused "
                                        "before key generation, or streams its encoded diagonals (re-encodes them "
                                        "each call) when those alone are over", min=0)


@dataclass(frozen=True)
class MPCSessionConfig(SessionConfig):
    backend: ClassVar[str] = "mpc"

    parties: int = option(2, "number of party processes", min=2)
    data_party: int = option(0, "rank of the party that secret-shares the input", min=0)
    weight_party: int | None = option(1, "rank of the party sharing the weights (None: weights public)", min=0)
    output_party: int | None = option(None, "rank of the only party learning the output (None: the data party)",
                                      min=0)
    timeout: float = option(120.0, "seconds to wait on another party before PartyFailure", min=0)
    deadline: float | None = option(None, "seconds one whole call may take before PartyFailure (catches parties "
                                    "stuck in local work; None: no overall limit)", min=0)
    ttp: bool = option(False, "Beaver triples from a separate dealer process instead of party 0 (TFP)")
    dealer: str = option("tfp", "who deals Beaver triples: tfp (party 0; not secure), ttp (a separate unattested "
                         "process; same as ttp=True), enclave (the attested enclave given as enclave=...)",
                         choices=("tfp", "ttp", "enclave"))
    enclave: Any = option(None, "dealer='enclave': the enclave, a privml.parties.EnclaveDealer(address, "
                          "root_certificate, expected_pcrs) or a launched privml.enclave.EnclaveProcess", cli=False,
                          compare=False)
    range_margin: float = option(2.0, "headroom factor when checking calibrated ranges against fixed point", min=0)
    remote: Any = option(None, "{rank: 'host:port'}: parties on other machines, each served by "
                         "`python -m privml.parties.remote` (a started session only)", cli=False)
    authkey: Any = option(None, "the party hosts' shared key (bytes, at least 16)", cli=False, compare=False)
    master_addr: str | None = option(None, "with remote=: the address where the parties meet (gloo), reachable "
                                     "from every machine")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("data_party", "weight_party", "output_party"):
            rank = getattr(self, name)
            if rank is not None and rank >= self.parties:
                raise InvalidInput(f"privml: {name} must be a party rank in 0..{self.parties - 1}, got {rank!r}")
        if self.ttp and self.dealer == "enclave":
            raise InvalidInput("privml: ttp=True and dealer='enclave' conflict: choose one dealer of Beaver triples")
        if (self.dealer == "enclave") != (self.enclave is not None):
            raise InvalidInput("privml: dealer='enclave' needs enclave=... (the enclave to take Beaver triples from), "
                               "and enclave=... needs dealer='enclave'")


@dataclass(frozen=True)
class HybridSessionConfig(SessionConfig):
    backend: ClassVar[str] = "hybrid"
    session_only: ClassVar[tuple[str, ...]] = ("min_flood_security_bits", "min_mask_bits", "min_relu_mask_bits",
                                               "require_refresh_flooding", "memory_limit")

    enclave: Any = option(None, "the enclave: an EnclaveProcess (or anything with address, root_certificate and "
                          "region), or None to launch a simulated one for this session", cli=False)
    allowed_regions: tuple[str, ...] | None = option(("eu-central-1",), "regions the enclave may run in "
                                                     "(checked in its attestation); None: any")
    rate_limit: float = option(1e6, "ciphertexts per second the enclave may decrypt for this key", min=0)
    timeout: float = option(60.0, "seconds to wait for the enclave before PartyFailure", min=0)
    release: bool = option(False, "flood the client's own decryptions too (outputs shown to others)")
    rekey: bool = option(True, "provision a fresh key when this one's decryption budget cannot cover the next batch "
                         "(False: DecryptionBudgetExhausted)")
    plaintext_cache_gb: float = option(2.5, "memory for encoded weight diagonals kept between calls (GB); beyond it "
                                       "they are re-encoded each call", min=0)
    memory_limit: float | None = option(None, "GB this session may use (its process, and the enclave it launches "
                                        "when enclave=None): a plan predicted to need more is refused before key "
                                        "generation; encoded diagonals beyond it are re-encoded each call", min=0)
    min_flood_security_bits: int = option(30, "refuse plans flooding at fewer bits of statistical security", min=30)
    min_mask_bits: int = option(16, "refuse plans blinding pure refreshes with smaller additive masks", min=1)
    min_relu_mask_bits: int = option(1, "refuse plans whose exact-ReLU masks span less than 2^this", min=0)
    require_refresh_flooding: bool = option(False, "refuse plans that flood only released outputs "
                                            "(flooding='release') instead of every refresh")


@dataclass(frozen=True)
class ServeConfig(_Config):
    """Options of the inference service (``privml serve``, :mod:`privml.serve`)."""

    backend: ClassVar[str] = "serve"

    host: str = option("127.0.0.1", "address to listen on (anything but loopback needs TLS or --insecure-http)")
    port: int = option(8443, "TCP port (0: any free one; the bound port is logged)", min=0, max=65535)
    tls_cert: str | None = option(None, "PEM certificate chain: serve HTTPS (clients pin it or its CA)")
    tls_key: str | None = option(None, "PEM private key of --tls-cert")
    insecure_http: bool = option(False, "allow plain HTTP on a non-loopback address (ciphertexts and keys then "
                                 "cross the network without integrity)")
    max_upload_mb: float = option(2048.0, "largest evaluation-key upload (MB)", min=0)
    max_request_mb: float = option(512.0, "largest inference request (MB)", min=0)
    max_clients: int = option(8, "evaluation-key sets kept in memory; the least recently used is dropped beyond "
                              "it (its client uploads again)", min=1)
    workers: int = option(0, "evaluation processes, each holding the keys of the clients assigned to it (use "
                          "up to one per core); 0: threads of the service process (SEAL holds the GIL there, so "
                          "they take turns instead of using more cores)", min=0)
    concurrency: int = option(1, "with workers=0: requests evaluated at once in threads (one client's requests run "
                              "one at a time)", min=1)
    queue: int = option(16, "requests waiting for a slot beyond which new ones get 503", min=0)
    timeout: float = option(600.0, "seconds a request may wait and run before 504", min=0)
    warm_up: bool = option(True, "CKKS: encode the weights for a client's keys when they are uploaded (one pass on "
                           "an encryption of zeros), not on its first request")
    read_timeout: float = option(60.0, "seconds a client may take to send its body before 408", min=0)


# ---------------------------------------------------------------------------------------------------------------
# the backends: the one declaration


CONFIGS: dict[str, type[CompileConfig]] = {cls.backend: cls for cls in (PlainConfig, CKKSConfig, MPCConfig,
                                                                         HybridConfig)}
SESSION_CONFIGS: dict[str, type[SessionConfig]] = {
    cls.backend: cls for cls in (PlainSessionConfig, CKKSSessionConfig, MPCSessionConfig, HybridSessionConfig)}
BACKENDS: tuple[str, ...] = tuple(CONFIGS)


def check_backend(backend: object) -> str:
    """``backend`` if privml has it, else ``InvalidInput`` listing the ones it has."""
    if not isinstance(backend, str) or backend not in CONFIGS:
        close = difflib.get_close_matches(backend, BACKENDS, n=1) if isinstance(backend, str) else []
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidInput(f"privml: backend {backend!r} is not available in this privml version; {hint}"
                           f"choose one of {', '.join(BACKENDS)}")
    return backend


def compile_config(backend: str | None = None, config: CompileConfig | None = None,
                   **options: Any) -> CompileConfig:
    """The compile config for ``backend`` from ``config`` and/or keyword ``options`` (options override)."""
    if config is not None:
        if not isinstance(config, CompileConfig) or type(config) not in CONFIGS.values():
            raise InvalidInput(f"privml: config must be one of {', '.join(c.__name__ for c in CONFIGS.values())}, "
                               f"got {type(config).__name__}")
        if backend is not None and backend != config.backend:
            raise InvalidInput(f"privml: backend {backend!r} does not match the {type(config).__name__} given")
        return config.replace(**options) if options else config
    return CONFIGS[check_backend("plain" if backend is None else backend)].from_options(**options)


def session_config(backend: str, config: SessionConfig | None = None, **options: Any) -> SessionConfig:
    """The session config for ``backend`` from ``config`` and/or keyword ``options`` (options override)."""
    cls = SESSION_CONFIGS[check_backend(backend)]
    if config is None:
        return cls.from_options(**options)
    if type(config) is not cls:
        raise InvalidInput(f"privml: a {backend} session takes a {cls.__name__}, got {type(config).__name__}")
    return config.replace(**options) if options else config


def config_from_dict(d: dict[str, Any], backend: str | None = None) -> CompileConfig:
    """Restore a compile config from its ``to_dict`` form (validation data is not stored: it comes back None).

    Plans written before typed configs hold bare options without ``type``: ``backend`` names their class.
    """
    d = dict(d)
    name = d.pop("type", None)
    by_name = {cls.__name__: cls for cls in CONFIGS.values()}
    if name is None:
        cls = CONFIGS[check_backend(backend)]
    elif name in by_name:
        cls = by_name[name]
    else:
        raise InvalidInput(f"privml: unknown config type {name!r}; expected one of {', '.join(by_name)}")
    if isinstance(d.get("validation"), (dict, str)):
        d["validation"] = None
    return cls.from_options(**d)


def cli_fields(classes: typing.Iterable[type[_Config]]) -> Iterator[tuple[dataclasses.Field, Any, list[str]]]:
    """(field, annotation, backends declaring it) for every CLI option of ``classes``, each name once."""
    seen: dict[str, tuple[dataclasses.Field, Any, list[str]]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            if f.metadata.get("cli", True):
                seen.setdefault(f.name, (f, hints[f.name], []))[2].append(cls.backend)
    yield from seen.values()
