"""Who holds what in an MPC evaluation: data owners, a model owner, and the party that learns the output.

Two scenarios, one function (:func:`evaluate`):

(a) **data owner + model owner**: party 0 secret-shares its private input, party 1 its private
    weights (every parameter and buffer of the model becomes a secret-shared tensor inside the
    parties; party 0 builds the architecture with meta tensors, so it never has a single real
    weight), and only ``output_party`` learns the output.
(b) **several data owners**: e.g. two hospitals each share their own rows; the rows are
    concatenated along the batch (in rank order) into one evaluation, and with
    ``output_party="owners"`` each hospital learns the predictions for its own rows only.

Data and weights come from :class:`Source` objects (a callable or a file path) that are
evaluated *inside the owning party's process*: each source travels only to its owner (as that
party's private process argument), so the launching process never holds the data or weights.
Every party returns a record of the plaintexts it held (``held``: what, shape, fingerprint)
and the fingerprints of every plain float tensor alive in it at three checkpoints (sources
loaded, weights and rows shared, output opened: ``fingerprints``), so
a test can check that no process ever held another party's plaintext. Sources can also log
every serve (who got what) to a file.

Across machines, each machine runs ``join_party(evaluation_party, (job, own))`` with the same
``job`` (see :func:`make_job`) and its own ``own`` (its sources only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from privml.backends.mpc import MPCTensor, PartyRuntime, check_fixed_point, fingerprint, live_fingerprints
from privml.errors import InvalidInput, MalformedInput, PartyFailure
from privml.parties.launcher import PartyContext, agree, model_digest, run_parties
from privml.tensor import module_scope

OWNERS = "owners"  # output_party value: each data owner learns the outputs of its own rows
_MAX_DIMS = 8


# --------------------------------------------------------------------------------------------- sources
def _load_path(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return torch.load(path, weights_only=True)
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".csv":
        return torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float32))
    raise InvalidInput(f"privml: cannot load {path}: use a .pt/.pth (torch.save), .npy or .csv file")


def _tensors_of(value: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items() if isinstance(v, torch.Tensor)]
    if isinstance(value, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return [("", value)] if isinstance(value, torch.Tensor) else []


@dataclass
class Source:
    """Where one party's private data or weights come from, evaluated only in that party's process.

    ``load`` is a picklable zero-argument callable (e.g. a module-level function or a
    ``functools.partial``) or a file path (.pt/.pth, .npy, .csv). ``log``: a file to which every
    serve appends one JSON line (source name, receiving rank/role/pid, fingerprints), so the data
    holder can audit who received what.
    """

    load: Callable[[], Any] | str | os.PathLike
    name: str = ""
    log: str | None = None

    def __post_init__(self) -> None:
        if not (callable(self.load) or isinstance(self.load, (str, os.PathLike))):
            raise InvalidInput(f"privml: a Source needs a callable or a file path, got {type(self.load).__name__}")
        if not self.name:
            func = getattr(self.load, "func", self.load)  # a functools.partial names its function
            self.name = getattr(func, "__name__", None) or str(self.load)

    def serve(self, ctx: PartyContext) -> Any:
        """Produce the value (inside party ``ctx.rank``) and log the serve."""
        value = self.load() if callable(self.load) else _load_path(Path(self.load))
        if self.log:
            entry = {"source": self.name, "rank": ctx.rank, "role": ctx.role, "pid": os.getpid(),
                     "tensors": {k: fingerprint(v) for k, v in _tensors_of(value) if v.is_floating_point()}}
            with open(self.log, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        return value


def as_source(value: Any) -> Source:
    """A :class:`Source` from a Source, callable or path."""
    return value if isinstance(value, Source) else Source(value)


# --------------------------------------------------------------------------------------------- party helpers
def _is_architecture(mod: nn.Module) -> bool:
    """privml's own modules (polynomial activations) carry public architecture, not the owner's weights."""
    return type(mod).__module__.startswith("privml.")


def _private_slots(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, qualified name) of every float parameter and buffer holding the owner's weights."""
    slots = []
    for qual, mod in model.named_modules():
        if _is_architecture(mod):
            continue
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and t.is_floating_point():
                slots.append((mod, name, f"{qual}.{name}" if qual else name))
    return slots


def strip_weights(model: nn.Module) -> nn.Module:
    """Replace every weight-bearing tensor by a meta tensor of the same shape (in place): architecture only."""
    for mod, name, _ in _private_slots(model):
        t = getattr(mod, name)
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        if name in mod._parameters:
            mod._parameters[name] = nn.Parameter(meta, requires_grad=False)
        else:
            mod._buffers[name] = meta
    return model


def share_module(model: nn.Module, rt: PartyRuntime, owner: int) -> nn.Module:
    """Turn every weight of ``model`` into a tensor secret-shared by party ``owner`` (in place).

    Every party calls it with the same architecture; only the owner's tensors are read (the
    others may be meta tensors). The order of sharing is the module order, the same everywhere.
    """
    for mod, name, qual in _private_slots(model):
        t = getattr(mod, name)
        shared = rt.share(t.detach() if rt.rank == owner else None, tuple(t.shape), owner, what=f"weight {qual}",
                          label="<share weights>")
        if name in mod._parameters:
            del mod._parameters[name]
        else:
            del mod._buffers[name]
        setattr(mod, name, shared)
    return model


def prepare_model(model: nn.Module) -> nn.Module:
    """What privml.compile does before calibration, without data: eval mode, no in-place ops, BatchNorm folded."""
    from privml.compiler.validate import fix

    gm, _ = fix(model)
    return gm


def _announce_rows(rt: PartyRuntime, rows: torch.Tensor | None) -> list[tuple[int, ...] | None]:
    """Every party learns every data owner's (rows, *sample shape); None for parties without data."""
    vec = torch.zeros(_MAX_DIMS + 1, dtype=torch.long)
    vec[0] = -1
    if rows is not None:
        if rows.dim() < 1 or rows.dim() > _MAX_DIMS:
            raise InvalidInput(f"privml: party {rt.rank}'s rows have {rows.dim()} dimensions")
        vec[0] = rows.dim()
        vec[1:rows.dim() + 1] = torch.tensor(rows.shape)
    with rt.scope("<agree>"):
        gathered = rt.crypten.comm.get().all_gather(vec)
    return [None if int(v[0]) < 0 else tuple(int(s) for s in v[1:int(v[0]) + 1]) for v in gathered]


def _rows_of(value: Any) -> torch.Tensor:
    if isinstance(value, torch.utils.data.TensorDataset):
        value = value.tensors[0]
    elif isinstance(value, (tuple, list)):
        value = value[0]
    rows = torch.as_tensor(value)
    if not rows.is_floating_point():
        rows = rows.float()
    if rows.dim() < 2 or not torch.isfinite(rows).all():
        raise InvalidInput(f"privml: a data source must serve finite rows shaped (n, *sample), got {tuple(rows.shape)}")
    return rows.to(torch.float32)


def _build_model(job: dict, weights: Source | None, ctx: PartyContext, rt: PartyRuntime) -> nn.Module:
    if weights is None:
        return strip_weights(job["model_spec"]())
    served = weights.serve(ctx)
    if isinstance(served, nn.Module):
        model = served
    elif isinstance(served, Mapping):
        model = job["model_spec"]()
        model.load_state_dict(served)
    else:
        raise MalformedInput(f"privml: the weight source served {type(served).__name__}; serve an nn.Module or a "
                             "state_dict")
    for name, t in _tensors_of(model):
        if t.is_floating_point():
            rt.note("own weight (loaded)", t, source=f"{weights.name}:{name}")
    return model


def evaluation_party(ctx: PartyContext, job: dict, own: dict) -> dict:
    """One party of :func:`evaluate` (usable with ``join_party`` on its own machine).

    ``own`` holds this party's sources only: ``{"data": Source | None, "weights": Source | None}``.
    """
    rt = PartyRuntime()
    rows = None
    if own.get("data") is not None:
        rows = _rows_of(own["data"].serve(ctx))
        rt.note("own rows (loaded)", rows, source=own["data"].name)
    announced = _announce_rows(rt, rows)
    owners = job["data_parties"]
    wrong = [r for r, a in enumerate(announced) if (a is not None) != (r in owners)]
    if wrong:
        raise PartyFailure(f"privml: parties {wrong} disagree with the job about who shares data (owners {owners})")
    samples = {r: announced[r][1:] for r in owners}
    expected = tuple(job["input_shape"]) if job.get("input_shape") else samples[owners[0]]
    odd = {r: s for r, s in samples.items() if s != expected}
    if odd:
        listing = ", ".join(f"party {r}: {samples[r]}" for r in owners)
        raise PartyFailure(f"privml: data owners {sorted(odd)} share rows of a different shape than {expected} "
                           f"({listing})")
    model = prepare_model(_build_model(job, own.get("weights"), ctx, rt))
    seen = set(live_fingerprints())  # heap scans at three checkpoints: loaded, shared, finished
    with rt.scope("<agree>"):
        agree(ctx, model_digest(model, expected), "model architecture/parameter shapes")
    share_module(model, rt, job["weight_party"])
    parts, starts = [], {}
    for r in owners:
        starts[r] = (sum(announced[q][0] for q in owners if q < r), announced[r][0])
        parts.append(rt.share(rows if r == rt.rank else None, announced[r], r, what="rows", label="<share input>"))
    total_rows = sum(announced[r][0] for r in owners)
    x = MPCTensor(rt.crypten.cat([p.payload for p in parts], dim=0), (total_rows, *expected), torch.float32,
                  runtime=rt)
    seen.update(live_fingerprints())
    with torch.no_grad(), module_scope(model):
        out = model(x)
    if not isinstance(out, MPCTensor):
        raise InvalidInput(f"privml: the model returned {type(out).__name__}, not a private tensor")
    output: Any = None
    target = job["output_party"]
    if target == OWNERS:
        for r in owners:
            start, n = starts[r]
            got = rt.open(out[start:start + n], dst=r, what="output rows", label="<open output>")
            output = got if got is not None else output
    else:
        output = rt.open(out, dst=target, what="output", label="<open output>")
    return {"rank": ctx.rank, "role": ctx.role, "pid": os.getpid(), "output": output,
            "rows": {r: announced[r][0] for r in owners}, "costs": rt.costs(), "held": rt.held,
            "fingerprints": sorted(seen.union(live_fingerprints()))}


# --------------------------------------------------------------------------------------------- launcher side
@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    ``output``: the output party's result (``{rank: rows}`` with ``output_party="owners"``, the
    full tensor otherwise). ``parties``: per party its rank, role, pid, whether it received an
    output, ``held`` (the plaintexts it held) and ``fingerprints`` (of every plain float tensor
    alive in it at the three checkpoints of :func:`evaluation_party`). ``costs``: whole-system
    bytes/rounds/seconds, total and per layer.
    """

    output: Any
    parties: list[dict[str, Any]]
    costs: dict[str, Any]
    provider: str
    seconds: float
    roles: list[str] = field(default_factory=list)

    def who_held_what(self) -> str:
        """A readable account of the plaintexts each party process held."""
        lines = []
        for p in self.parties:
            lines.append(f"party {p['rank']} ({p['role']}, pid {p['pid']}):")
            for h in p["held"]:
                src = f" from {h['source']}" if h["source"] else ""
                lines.append(f"  - {h['what']}{src}: shape {list(h['shape'])}, sha256 {h['sha256']}")
            if not p["held"]:
                lines.append("  - nothing in clear")
        return "\n".join(lines)


def role_names(world_size: int, data_parties: list[int], weight_party: int, output_party: Any) -> list[str]:
    names = []
    for r in range(world_size):
        tags = (["data"] if r in data_parties else []) + (["model"] if r == weight_party else [])
        if output_party == r or (output_party == OWNERS and r in data_parties) or output_party is None:
            tags.append("output")
        names.append("-".join([f"party{r}", *tags]))
    return names


def make_job(model_spec: Callable[[], nn.Module], data_parties: list[int], weight_party: int,
             output_party: Any = 0, input_shape: tuple[int, ...] | None = None) -> dict:
    """The public description of an evaluation that every party runs (no data, no weights)."""
    if not callable(model_spec):
        raise InvalidInput("privml: model_spec must be a picklable callable building the architecture "
                           "(e.g. a model class or functools.partial)")
    return {"model_spec": model_spec, "data_parties": sorted(data_parties), "weight_party": weight_party,
            "output_party": output_party, "input_shape": tuple(input_shape) if input_shape else None}


def evaluate(model_spec: Callable[[], nn.Module], data_sources: Mapping[int, Any], weight_source: tuple[int, Any],
             output_party: int | str | None = 0, *, world_size: int | None = None,
             input_shape: tuple[int, ...] | None = None, timeout: float = 120.0, ttp: bool = False,
             plan: Any = None, roles: list[str] | None = None, log_level: int = logging.WARNING,
             deadline: float | None = None, pool: Any = None) -> Evaluation:
    """Evaluate a model whose weights belong to one party on rows that belong to others, in party processes.

    ``model_spec``: picklable zero-argument callable building the architecture (every party calls
    it; parties without the weights turn it into meta tensors). ``data_sources``: ``{rank: source}``
    for each data owner; ``weight_source``: ``(rank, source)`` serving an ``nn.Module`` or a
    ``state_dict``. ``output_party``: the rank that learns the output, ``None`` for every party, or
    ``"owners"`` for each data owner learning its own rows' outputs. ``plan`` (optional, from
    ``privml.compile(..., backend="mpc")``) is checked for fixed-point overflow before anything
    starts. Raises ``PartyFailure`` if a party fails, dies, stops answering for ``timeout``
    seconds, or holds a different model or row shape than the others; with ``deadline`` also when the whole
    evaluation (e.g. a data owner's source that blocks) outlasts it. ``pool``: where the party processes run
    instead of fresh local ones, e.g. a :class:`privml.parties.netlab.NetLab` (one network namespace per party).
    """
    if not isinstance(data_sources, Mapping) or not data_sources:
        raise InvalidInput("privml: data_sources must be a non-empty {rank: source} mapping")
    if not (isinstance(weight_source, tuple) and len(weight_source) == 2):
        raise InvalidInput("privml: weight_source must be a (rank, source) pair")
    weight_party, wsource = weight_source
    data_parties = sorted(data_sources)
    used = data_parties + [weight_party] + ([output_party] if isinstance(output_party, int) else [])
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in used):
        raise InvalidInput(f"privml: party ranks must be non-negative ints, got {used}")
    world_size = world_size if world_size is not None else max(used) + 1
    if max(used) >= world_size or world_size < 2:
        raise InvalidInput(f"privml: ranks {used} do not fit world_size={world_size} (at least 2 parties)")
    if not (output_party is None or output_party == OWNERS or isinstance(output_party, int)):
        raise InvalidInput(f"privml: output_party must be a rank, None or 'owners', got {output_party!r}")
    if plan is not None:
        for note in check_fixed_point(plan):
            logging.getLogger("privml.mpc").warning(note)
    job = make_job(model_spec, data_parties, weight_party, output_party, input_shape)
    rank_args = []
    for r in range(world_size):
        own = {"data": as_source(data_sources[r]) if r in data_sources else None,
               "weights": as_source(wsource) if r == weight_party else None}
        rank_args.append((own,))
    names = roles or role_names(world_size, data_parties, weight_party, output_party)
    if pool is not None:
        results = pool.run(evaluation_party, (job,), rank_args=rank_args, timeout=timeout, roles=names)
    else:
        results = run_parties(evaluation_party, world_size, (job,), timeout=timeout, ttp=ttp, roles=names,
                              rank_args=rank_args, log_level=log_level, deadline=deadline)
    from privml.parties.costs import combine_summaries

    if output_party == OWNERS:
        output: Any = {r: results[r]["output"] for r in data_parties}
    else:
        output = results[output_party if output_party is not None else 0]["output"]
    parties = [{"rank": r["rank"], "role": r["role"], "pid": r["pid"], "received_output": r["output"] is not None,
                "held": r["held"], "fingerprints": set(r["fingerprints"])} for r in results]
    return Evaluation(output=output, parties=parties, costs=combine_summaries([r["costs"] for r in results]),
                      provider=results.provider, seconds=results.seconds, roles=names)
