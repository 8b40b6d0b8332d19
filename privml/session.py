"""``privml.Session``: the explicit holder of keys / parties / enclave for one plan (no global state)."""

from __future__ import annotations

from typing import Any

import torch

from privml.backends import load_backend
from privml.compiler.api import check_input
from privml.compiler.client import apply_client_ops
from privml.compiler.plan import Plan
from privml.config import SessionConfig, session_config
from privml.errors import InvalidInput, RangeViolation
from privml.tensor import PrivateTensor

_UNSET = object()


class Session:
    """Encrypts inputs and decrypts outputs for models compiled with ``plan``.

    Options are typed (:mod:`privml.config`): ``config=MPCSessionConfig(parties=3)`` or the same as
    keywords (``parties=3``); ``range_slack`` for every backend, the rest go to the backend
    (e.g. ``simulation="ckks"`` for plain). An unknown name is refused with the closest valid one.
    """

    def __init__(self, plan: Plan, range_slack: Any = _UNSET, *, config: SessionConfig | None = None,
                 **options: Any) -> None:
        if not isinstance(plan, Plan):
            raise InvalidInput(f"privml: Session needs a Plan (compiled.plan), got {type(plan).__name__}")
        if range_slack is not _UNSET:  # positional, as before the typed configurations
            options["range_slack"] = range_slack
        self.plan = plan
        self.config = session_config(plan.backend, config, **options)
        self.range_slack = self.config.range_slack
        self.backend = load_backend(plan.backend).make_backend(plan, **self.config.backend_options())

    def encrypt(self, x: torch.Tensor) -> PrivateTensor:
        """A private tensor holding ``x`` (batch first, shaped like the calibration samples)."""
        check_input(x, self.plan.input_shape)
        return self.backend.encrypt(x.detach())

    def decrypt(self, t: PrivateTensor) -> torch.Tensor:
        """The clear value of a private tensor produced under this session."""
        if not isinstance(t, PrivateTensor):
            raise InvalidInput(f"privml: decrypt needs a private tensor, got {type(t).__name__}")
        if type(t).backend_name != self.plan.backend:
            raise InvalidInput(f"privml: cannot decrypt a {type(t).backend_name} tensor in a {self.plan.backend} "
                               "session")
        out = self.backend.decrypt(t)
        self.check_output_range(out)
        return apply_client_ops(out, self.plan.params.get("client_ops", []))

    def check_output_range(self, out: torch.Tensor) -> None:
        """Raise ``RangeViolation`` if decrypted values fall far outside the calibrated output range.

        Encrypted backends fail silently: an intermediate value leaving its polynomial's interval, or a
        CKKS value wrapping around its modulus, shows up as outputs far from anything seen in calibration.
        The window is the calibrated range widened by ``range_slack`` times its half-width on each side
        (``range_slack=None`` disables the check).
        """
        rng = self.plan.params.get("output_range")
        if self.range_slack is None or not rng or out.shape[-1:] == (0,):
            return
        lo, hi = float(rng[0]), float(rng[1])
        center, half = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
        worst = float((out - center).abs().max()) if out.numel() else 0.0
        if not worst <= half * (1 + self.range_slack):
            raise RangeViolation(
                f"privml: decrypted outputs reach {worst:.4g} from the calibrated center {center:.4g}, beyond "
                f"{1 + self.range_slack:.3g}x the calibrated half-width {half:.4g}: an intermediate value probably "
                "left the interval its approximation or encoding was planned for, so these numbers cannot be "
                "trusted. Recompile with calibration data that covers these inputs (or a larger margin).")
