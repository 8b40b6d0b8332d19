"""The ``plain`` backend: privml's op table executed in clear, the reference for every other backend.

It answers "what will the encrypted model compute?" without keys: the same ops
are allowed (anything else raises ``UnsupportedOperation`` exactly as a real
backend would), and an optional simulation perturbs every arithmetic result the
way CKKS noise (``mode="ckks"``) or fixed-point MPC (``mode="fixed_point"``)
would. It never stands in for a cryptographic backend in tests of that backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map

from privml.errors import RangeViolation
from privml.registry import REGISTRY
from privml.tensor import PrivateTensor, out_of_place
from privml.tensor.base import private_args

aten = torch.ops.aten


@dataclass
class Simulation:
    """How the plain backend perturbs results to mimic an encrypted backend.

    ``mode``: "none" (exact), "ckks" (additive Gaussian noise of std ``ckks_noise_std``
    after every arithmetic op; the default matches scale 2^40 at N=8192 with margin),
    or "fixed_point" (round to ``2**-frac_bits`` like CrypTen's encoder and fail with
    ``RangeViolation`` where a product could wrap the 64-bit ring).
    """

    mode: str = "none"
    ckks_noise_std: float = 2.0**-24
    frac_bits: int = 16
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("none", "ckks", "fixed_point"):
            raise ValueError(f"unknown simulation mode {self.mode!r}: use 'none', 'ckks' or 'fixed_point'")
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def fixed_point_limit(self) -> float:
        """Largest |value| a product may reach before it wraps CrypTen's 64-bit ring (2^31 for 16 fractional bits)."""
        from privml.parties.fixed_point import fixed_point_limit

        return fixed_point_limit(self.frac_bits)

    def apply(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.mode == "ckks":
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float64) * self.ckks_noise_std
            return x + noise.to(x.dtype)
        if self.mode == "fixed_point":
            limit = self.fixed_point_limit
            peak = float(x.abs().max()) if x.numel() else 0.0
            if peak >= limit:
                raise RangeViolation(
                    f"privml: '{op}' produced |value| = {peak:.4g}, beyond the fixed-point headroom "
                    f"{limit:.4g} for {self.frac_bits} fractional bits: results would wrap around silently. "
                    "Rescale the inputs or lower frac_bits."
                )
            scale = 2.0**self.frac_bits
            return torch.round(x * scale) / scale
        return x


class PlainTensor(PrivateTensor):
    """A clear tensor wearing the private-tensor API (payload: a torch.Tensor of the logical shape)."""

    backend_name = "plain"
    metadata_fields = ("simulation",)


def _sim_of(args: tuple, kwargs: dict) -> Simulation:
    for a in private_args(list(args) + list(kwargs.values())):
        if isinstance(a, PlainTensor):
            return a.simulation
    return Simulation()


def _unwrap(a: object) -> object:
    return a.payload if isinstance(a, PlainTensor) else a


def _eval_form(func: object, kwargs: dict) -> dict:
    """Private tensors never mutate: in-place flags are dropped, the result is a new tensor."""
    return {k: v for k, v in kwargs.items() if k != "inplace"}


@PlainTensor.implements(*(spec.name for spec in REGISTRY if spec.needs_handler("plain")))
def _run(func: object, types: tuple, args: tuple, kwargs: dict) -> object:
    """Run ``func`` on the payloads and wrap tensor results, simulating noise where arithmetic happened."""
    sim = _sim_of(args, kwargs)
    spec = REGISTRY.for_function(func)
    target = out_of_place(func)
    with torch._C.DisableTorchFunctionSubclass():
        out = target(*tree_map(_unwrap, args), **tree_map(_unwrap, _eval_form(func, kwargs)))
    exact = spec is not None and spec.kind in ("shape", "identity", "metadata")

    def wrap(o: object) -> object:
        if isinstance(o, torch.Tensor) and not isinstance(o, PrivateTensor):
            data = o if exact else sim.apply(o, spec.name if spec else str(func))
            return PlainTensor(data, data.shape, data.dtype, simulation=sim)
        return o

    return tree_map(wrap, out)


# aten-level fallback: ops reached only through decomposition (e.g. nn.Linear via addmm under autograd).
PlainTensor.implements_aten([aten.detach.default, aten.alias.default, aten.clone.default, aten.view.default,
                             aten._unsafe_view.default, aten.t.default, aten.addmm.default, aten.mm.default,
                             aten.add.Tensor, aten.mul.Tensor, aten.relu.default, aten._to_copy.default])(_run)


class PlainBackend:
    """Encrypt/decrypt for the plain backend: wraps and unwraps, with an optional simulation."""

    name = "plain"

    def __init__(self, simulation: Simulation | None = None) -> None:
        self.simulation = simulation or Simulation()

    def encrypt(self, x: torch.Tensor) -> PlainTensor:
        data = self.simulation.apply(x.detach().clone(), "encrypt")
        return PlainTensor(data, data.shape, data.dtype, simulation=self.simulation)

    def decrypt(self, t: PlainTensor) -> torch.Tensor:
        return t.payload.detach().clone()

    def visibility(self) -> list[dict[str, str]]:
        """Who saw what, one row per role (the columns of the report's table)."""
        return [{"role": "whoever runs the model", "input": "plaintext", "weights": "plaintext",
                 "output": "plaintext", "keys": "none (nothing is encrypted)", "also sees": "everything"}]

    def attacker_model(self) -> str:
        return "none: no protection at all; the clear reference that predicts what the encrypted backends compute."

    def trust_statement(self) -> list[str]:
        """Who saw what: here, everyone sees everything."""
        return [
            "plain backend: NO encryption. Inputs, weights and outputs are visible to whoever runs the model; "
            f"this is the reference simulation used to predict encrypted accuracy (simulation: {self.simulation.mode})."
        ]


def make_backend(plan: object = None, simulation: Simulation | str | None = None, **_: object) -> PlainBackend:
    """Backend factory used by ``privml.Session`` (``simulation`` may be a mode name)."""
    if isinstance(simulation, str):
        simulation = Simulation(simulation)
    return PlainBackend(simulation)

