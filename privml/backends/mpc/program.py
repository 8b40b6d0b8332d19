"""Lazy programs: ops recorded on a session's input in the caller's process, replayed by the parties.

The caller never initialises CrypTen: ``session.encrypt(x)`` returns the input node of a
:class:`Program`, each op on it appends a :class:`Step` (protocol key, argument templates, cost
label), and ``finalize()`` launches the parties. Each party receives only what it owns (the data
party ``x``, the weight party the constants), shares them, replays the steps by key with
:func:`privml.backends.mpc.handlers.execute` and opens the output to the output party.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from privml.backends.mpc.handlers import execute, label
from privml.backends.mpc.tensor import LazyNode, MPCTensor, Opened, PartyRuntime
from privml.errors import InvalidInput
from privml.tensor import out_of_place
from privml.tensor.base import unsupported


@dataclass(frozen=True)
class Ref:
    """A reference to a program node inside a recorded op's arguments."""

    node: int


@dataclass(frozen=True)
class Const:
    """A plain tensor argument (a model weight) of a recorded op, by index into the program's constants."""

    index: int


@dataclass
class Step:
    """One recorded op: protocol key, argument templates (Ref/Const/plain values), cost label, output node."""

    name: str
    args: tuple
    kwargs: dict
    label: str
    node: int


def _meta(a: Any) -> Any:
    if isinstance(a, MPCTensor):
        return torch.empty(a.shape, device="meta")
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return a


def _zeros(a: Any) -> Any:
    if isinstance(a, MPCTensor):
        return torch.zeros(a.shape)
    if isinstance(a, torch.Tensor):
        return torch.zeros(a.shape, dtype=a.dtype)
    return a


def _infer_shape(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Output shape of ``func`` on stand-ins of the operands (meta tensors, zeros as a fallback)."""
    target = out_of_place(func)
    for stand_in in (_meta, _zeros):
        try:
            with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
                out = target(*tree_map(stand_in, args), **tree_map(stand_in, kwargs))
            if isinstance(out, torch.Tensor):
                return tuple(out.shape)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
            continue
    raise unsupported(MPCTensor, func, args, kwargs, "its output shape could not be determined.")


class Program:
    """The ops a model applied to one lazy input, recorded in the caller's process and replayed by the parties.

    ``backend`` is the :class:`~privml.backends.mpc.backend.MPCBackend` whose roles, timeout and
    dealer setting the run uses (and whose ``runs`` receive its costs).
    """

    def __init__(self, backend: Any, x: torch.Tensor) -> None:
        self.backend = backend
        self.x = x.detach().to(torch.float32).clone()
        self.steps: list[Step] = []
        self.constants: list[torch.Tensor] = []
        self._const_ids: dict[int, int] = {}
        self.costs: dict[str, Any] | None = None
        self.ran = False

    def input(self) -> MPCTensor:
        return MPCTensor(LazyNode(0), tuple(self.x.shape), torch.float32, runtime=self)

    def _template(self, a: Any) -> Any:
        if isinstance(a, MPCTensor):
            if not isinstance(a.payload, LazyNode) or a.runtime is not self:
                raise InvalidInput("privml: an op mixes tensors from different MPC programs")
            return Ref(a.payload.node)
        if isinstance(a, torch.Tensor):
            key = id(a)
            if key not in self._const_ids:
                self._const_ids[key] = len(self.constants)
                self.constants.append(a)  # keep it alive so the id stays unique
            return Const(self._const_ids[key])
        return a

    def record(self, name: str, func: Any, args: tuple, kwargs: dict) -> MPCTensor:
        """Append protocol ``name`` applied to ``args``; the result is a lazy node of the inferred shape."""
        if self.ran:
            raise InvalidInput("privml: this MPC program already ran; encrypt a new input for a new evaluation")
        shape = _infer_shape(func, args, kwargs)
        node = len(self.steps) + 1
        self.steps.append(Step(name, tree_map(self._template, args), tree_map(self._template, kwargs),
                               label(name), node))
        return MPCTensor(LazyNode(node), shape, torch.float32, runtime=self)

    def run(self, out: MPCTensor) -> MPCTensor:
        """Launch the parties, replay the program on secret shares, open ``out`` to the output party."""
        b = self.backend
        self.ran = True
        consts = [c.detach().to(torch.float32).clone() for c in self.constants]
        skeleton = {"steps": self.steps, "input_shape": tuple(self.x.shape), "output": out.payload.node,
                    "const_shapes": [tuple(c.shape) for c in consts], "data_party": b.data_party,
                    "weight_party": b.weight_party, "output_party": b.output_party}
        rank_args = []
        for r in range(b.parties):
            own = {"input": self.x if r == b.data_party else None,
                   "constants": consts if b.weight_party in (None, r) else None}
            rank_args.append((own,))
        from privml.parties.costs import combine_summaries
        from privml.parties.launcher import run_parties

        pool = getattr(b, "pool", None)
        if pool is not None:  # a started session: its parties stay up between calls
            results = pool.run(replay_party, (skeleton,), rank_args=rank_args)
        elif getattr(b, "remote", None):
            raise InvalidInput("privml: parties on other machines (remote=) serve started sessions only: use "
                               "`with privml.Session(plan, remote=..., authkey=...) as s:` or s.start()")
        else:
            results = run_parties(replay_party, b.parties, (skeleton,), timeout=b.timeout, ttp=b.ttp,
                                  roles=b.roles, rank_args=rank_args, dealer=getattr(b, "enclave_dealer", None),
                                  deadline=getattr(b, "deadline", None))
        reader = b.output_party if b.output_party is not None else 0
        value = results[reader]["output"]
        self.costs = combine_summaries([r["costs"] for r in results])
        self.costs["seconds_wall"] = results.seconds
        b.runs.append({"costs": self.costs, "held": [r["held"] for r in results]})
        return MPCTensor(Opened(value), tuple(value.shape), torch.float32, runtime=self)


def _resolve(rt: PartyRuntime, template: Any, env: dict[int, MPCTensor], consts: list, skeleton: dict,
             cache: dict[int, Any]) -> Any:
    """Turn argument templates back into operands: nodes, weights (shared by the weight party, or public)."""
    def one(a: Any) -> Any:
        if isinstance(a, Ref):
            return env[a.node]
        if isinstance(a, Const):
            if a.index not in cache:
                owner = skeleton["weight_party"]
                if owner is None:  # public weights: every party holds them in clear
                    cache[a.index] = consts[a.index]
                else:
                    value = consts[a.index] if rt.rank == owner else None
                    cache[a.index] = rt.share(value, skeleton["const_shapes"][a.index], owner, what="weight",
                                              label="<share weights>")
            return cache[a.index]
        return a

    return tree_map(one, template)


def replay_party(ctx: Any, skeleton: dict, own: dict) -> dict:
    """Party side of :meth:`Program.run`: share input and weights, replay every step, open the output."""
    from privml.parties.launcher import agree

    h = hashlib.sha256(repr([(s.name, s.node) for s in skeleton["steps"]]).encode())
    h.update(repr((skeleton["input_shape"], skeleton["const_shapes"])).encode())
    agree(ctx, h.digest(), "program (model/shapes)")
    rt = PartyRuntime()
    consts = own["constants"]
    if consts is not None and skeleton["weight_party"] is None:
        for c in consts:
            rt.note("public weight", c)
    x = rt.share(own["input"], skeleton["input_shape"], skeleton["data_party"], what="input", label="<share input>")
    env: dict[int, MPCTensor] = {0: x}
    cache: dict[int, Any] = {}
    for step in skeleton["steps"]:
        args = _resolve(rt, step.args, env, consts, skeleton, cache)
        kwargs = _resolve(rt, step.kwargs, env, consts, skeleton, cache)
        env[step.node] = execute(rt, step.name, args, kwargs, cost_label=step.label)
    value = rt.open(env[skeleton["output"]], dst=skeleton["output_party"], label="<open output>")
    return {"output": value, "costs": rt.costs(), "held": rt.held}
