"""``privml.Session``: the explicit holder of keys / parties / enclave for one plan (no global state)."""

from __future__ import annotations

from typing import Any

import torch

from privml.backends import load_backend
from privml.compile.api import check_input
from privml.compile.plan import Plan
from privml.errors import InvalidInput
from privml.tensor import PrivateTensor


class Session:
    """Encrypts inputs and decrypts outputs for models compiled with ``plan``.

    ``options`` go to the backend (e.g. ``simulation=Simulation("ckks")`` for plain).
    """

    def __init__(self, plan: Plan, **options: Any) -> None:
        if not isinstance(plan, Plan):
            raise InvalidInput(f"privml: Session needs a Plan (compiled.plan), got {type(plan).__name__}")
        self.plan = plan
        self.backend = load_backend(plan.backend).make_backend(plan, **options)

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
        return self.backend.decrypt(t)
