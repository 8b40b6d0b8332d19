"""Private training: SGD on rows secret-shared by several data owners, in real party processes.

Each data owner (e.g. two hospitals) secret-shares its own rows and labels from a :class:`Source`
evaluated inside its own process; the rows are concatenated (in rank order) into one training set
that no party sees in clear. The model starts from public initial weights (every party gets the
same ``nn.Module``), is trained with mini-batch SGD on softmax cross-entropy entirely on secret
shares, and only the trained weights are opened, to ``output_party`` (None: every party).

The model must be a chain of ``nn.Linear`` and ``nn.ReLU`` (plus Flatten/Identity/Dropout), e.g.
``BreastCancerLogReg`` or ``BreastCancerMLP``. Gradients are written out by hand (the same
formulas as torch autograd): ReLU keeps the comparison bit of the forward pass for the backward
pass, two-class softmax is ``sigmoid(l1 - l0)`` (cheaper and more accurate than CrypTen's
general softmax), and the 1/batch factor is applied with the learning rate at the update so the
back-propagated values stay of order one in fixed point. :func:`train_plain` runs the same
SGD (same initial weights, batch order, epochs and learning rate) with torch autograd in clear,
the reference private training is compared against.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from privml.errors import InvalidInput, PartyFailure, UnsupportedModule
from privml.parties.fixed_point import open_plain
from privml.parties.launcher import PartyContext, agree, model_digest, run_parties

_SKIP = (nn.Identity, nn.Dropout, nn.Flatten)


def layer_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of (name, Linear | ReLU); anything else raises UnsupportedModule."""
    from privml.compiler.capture import capture
    from privml.errors import Problem

    gm = capture(copy.deepcopy(model))
    modules = dict(gm.named_modules())
    chain, problems = [], []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.Linear, nn.ReLU)):
            if len(node.all_input_nodes) != 1:
                problems.append(Problem(str(node.target), "unsupported", "private training needs a chain of layers."))
            chain.append((str(node.target), mod))
        elif not isinstance(mod, _SKIP) and not (node.op == "call_method" and node.target in ("flatten", "view")):
            problems.append(Problem(str(node.target), "unsupported", f"{node.op} {node.target} is not a Linear or ReLU "
                                    "layer; private training supports chains of Linear and ReLU only."))
    if problems or not chain or not isinstance(chain[-1][1], nn.Linear):
        lines = "\n".join(f"  - {p}" for p in problems) or "  - the model must end with a Linear layer"
        raise UnsupportedModule(f"privml: cannot train {type(model).__name__} privately:\n{lines}", problems)
    return chain


def _batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[torch.Tensor]]:
    """The public batch order: per epoch a seeded permutation cut into batches (last one may be short)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out.append([perm[i:i + batch_size] for i in range(0, n, batch_size)])
    return out


def _check_hyper(epochs: int, lr: float, batch_size: int) -> None:
    if not (isinstance(epochs, int) and epochs >= 1 and isinstance(batch_size, int) and batch_size >= 1 and lr > 0):
        raise InvalidInput(f"privml: need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5, lr: float = 0.1,
                batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Plaintext reference: torch autograd + SGD with the same initial weights, batch order, epochs and lr."""
    _check_hyper(epochs, lr, batch_size)
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in _batches(len(x), batch_size, epochs, seed):
        for idx in epoch:
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax prediction equals the label."""
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------------- party side
def _softmax(logits: Any, crypten: Any) -> Any:
    """Row softmax of secret-shared logits; for two classes [1 - s, s] with s = sigmoid(l1 - l0)."""
    if logits.size(1) == 2:
        s = (logits[:, 1:2] - logits[:, 0:1]).sigmoid()
        return crypten.cat([s.neg().add(1.0), s], dim=1)
    return logits.softmax(1)


def _sgd_step(params: dict[str, list], chain: list[tuple[str, nn.Module]], xb: Any, yb: Any, lr: float,
              crypten: Any, meter: Any) -> None:
    """One SGD step on secret shares: forward (keeping ReLU bits), softmax-CE gradient, backward, update."""
    batch = xb.size(0)
    acts, bits = [], {}
    h = xb
    with meter.scope("forward"):
        for name, mod in chain:
            if isinstance(mod, nn.Linear):
                acts.append(h)
                w, b = params[name]
                h = h.matmul(w.t())
                if b is not None:
                    h = h.add(b)
            else:
                bits[name] = h.ge(0.0)  # the comparison bit, reused by the backward pass
                h = h.mul(bits[name])
        g = _softmax(h, crypten).sub(yb)  # d(sum of CE)/d logits; the 1/batch goes with lr below
    with meter.scope("backward+update"):
        for name, mod in reversed(chain):
            if isinstance(mod, nn.ReLU):
                g = g.mul(bits[name])
                continue
            a = acts.pop()
            w, b = params[name]
            grad_w = g.t().matmul(a)
            grad_b = g.sum(0) if b is not None else None
            if acts:  # propagate before updating w
                g = g.matmul(w)
            params[name][0] = w.sub(grad_w.mul(lr / batch))
            if b is not None:
                params[name][1] = b.sub(grad_b.mul(lr / batch))


def _rows_and_labels(value: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(value, torch.utils.data.TensorDataset):
        value = value.tensors
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise InvalidInput("privml: a training data source must serve (rows, labels)")
    x = torch.as_tensor(value[0]).to(torch.float32)
    y = torch.as_tensor(value[1]).long()
    if x.dim() != 2 or y.shape != (x.shape[0],) or not torch.isfinite(x).all():
        raise InvalidInput(f"privml: training rows must be (n, features) with labels (n,), got {tuple(x.shape)} "
                           f"and {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidInput(f"privml: labels must be in 0..{num_classes - 1}")
    return x, y


def training_party(ctx: PartyContext, job: dict, own: dict) -> dict:
    """One party of :func:`train_private` (usable with ``join_party``); ``own = {"data": Source | None}``."""
    from privml.backends.mpc import PartyRuntime, live_fingerprints
    from privml.mpc.roles import _announce_rows

    rt = PartyRuntime()
    crypten = rt.crypten
    model: nn.Module = job["model"]
    chain = layer_chain(model)
    num_classes = chain[-1][1].out_features
    rows = labels = None
    if own.get("data") is not None:
        rows, labels = _rows_and_labels(own["data"].serve(ctx), num_classes)
        rt.note("own rows (loaded)", rows, source=own["data"].name)
        rt.note("own labels (loaded)", labels.float(), source=own["data"].name)
    announced = _announce_rows(rt, rows)
    owners = job["data_parties"]
    if [r for r, a in enumerate(announced) if a is not None] != owners:
        raise PartyFailure(f"privml: the parties sharing rows ({[r for r, a in enumerate(announced) if a]}) are not "
                           f"the data owners of the job {owners}")
    width = {announced[r][1:] for r in owners}
    if len(width) != 1:
        raise PartyFailure(f"privml: data owners share rows of different shapes: {[announced[r] for r in owners]}")
    with rt.scope("<agree>"):
        agree(ctx, model_digest(model, next(iter(width))), "model / row shape")
    xs, ys = [], []
    for r in owners:
        n = announced[r][0]
        mine = r == ctx.rank
        xs.append(rt.share(rows if mine else None, announced[r], r, what="rows", label="<share data>").payload)
        onehot = F.one_hot(labels, num_classes).float() if mine else None
        ys.append(rt.share(onehot, (n, num_classes), r, what="labels", label="<share data>").payload)
    x_all, y_all = crypten.cat(xs, dim=0), crypten.cat(ys, dim=0)
    params = {}
    for name, mod in chain:  # public initial weights
        if isinstance(mod, nn.Linear):
            params[name] = [rt.public(mod.weight.detach()), rt.public(mod.bias.detach()) if mod.bias is not None
                            else None]
    seen = set(live_fingerprints())
    epoch_seconds = []
    for epoch in _batches(int(x_all.size(0)), job["batch_size"], job["epochs"], job["seed"]):
        start = time.perf_counter()
        for idx in epoch:
            _sgd_step(params, chain, x_all[idx], y_all[idx], job["lr"], crypten, rt.meter)
        epoch_seconds.append(time.perf_counter() - start)
    trained = {}
    with rt.scope("<open weights>"):
        for name, (w, b) in params.items():
            trained[f"{name}.weight"] = open_plain(w, dst=job["output_party"])
            if b is not None:
                trained[f"{name}.bias"] = open_plain(b, dst=job["output_party"])
    if job["output_party"] not in (None, ctx.rank):
        trained = None
    else:
        for k, v in trained.items():
            rt.note(f"trained {k}", v)
    seen.update(live_fingerprints())
    return {"rank": ctx.rank, "role": ctx.role, "pid": os.getpid(), "weights": trained, "costs": rt.costs(),
            "epoch_seconds": epoch_seconds, "held": rt.held, "fingerprints": sorted(seen)}


# --------------------------------------------------------------------------------------------- launcher side
@dataclass
class TrainResult:
    """The trained model (weights opened to the output party), costs, timing and who held what."""

    model: nn.Module | None
    costs: dict[str, Any]
    provider: str
    seconds: float
    epoch_seconds: list[float]
    parties: list[dict[str, Any]]


def train_private(model: nn.Module, data_sources: Mapping[int, Any], *, epochs: int = 5, lr: float = 0.1,
                  batch_size: int = 32, seed: int = 0, world_size: int | None = None,
                  output_party: int | None = None, timeout: float = 300.0, ttp: bool = False,
                  log_level: int = logging.WARNING, pool: Any = None) -> TrainResult:
    """Train ``model`` (public initial weights) by SGD on rows secret-shared by the data owners.

    ``data_sources``: ``{rank: source}``; each source (a :class:`privml.mpc.roles.Source`,
    callable or path) serves ``(rows, labels)`` and is evaluated only in its owner's process.
    Batches follow a public seeded permutation of all rows (rank order). Returns the trained model
    as opened to ``output_party`` (every party with None). ``pool``: where the parties run instead of fresh local
    processes, e.g. a :class:`privml.parties.netlab.NetLab` (one network namespace per party).
    """
    from privml.mpc.roles import as_source, role_names
    from privml.parties.costs import combine_summaries

    _check_hyper(epochs, lr, batch_size)
    layer_chain(model)  # fail early, in the caller, on unsupported models
    if not isinstance(data_sources, Mapping) or not data_sources:
        raise InvalidInput("privml: data_sources must be a non-empty {rank: source} mapping")
    owners = sorted(data_sources)
    used = owners + ([output_party] if output_party is not None else [])
    if not all(isinstance(r, int) and r >= 0 for r in used):
        raise InvalidInput(f"privml: party ranks must be non-negative ints, got {used}")
    world_size = world_size if world_size is not None else max(max(used) + 1, 2)
    if max(used) >= world_size or world_size < 2:
        raise InvalidInput(f"privml: ranks {used} do not fit world_size={world_size} (at least 2 parties)")
    job = {"model": copy.deepcopy(model).eval(), "data_parties": owners, "epochs": epochs, "lr": float(lr),
           "batch_size": batch_size, "seed": seed, "output_party": output_party}
    rank_args = [({"data": as_source(data_sources[r]) if r in data_sources else None},) for r in range(world_size)]
    names = role_names(world_size, owners, -1, output_party)
    if pool is not None:
        results = pool.run(training_party, (job,), rank_args=rank_args, timeout=timeout, roles=names)
    else:
        results = run_parties(training_party, world_size, (job,), timeout=timeout, ttp=ttp, roles=names,
                              rank_args=rank_args, log_level=log_level)
    weights = results[output_party if output_party is not None else 0]["weights"]
    trained = copy.deepcopy(model)
    trained.load_state_dict({**trained.state_dict(), **weights})
    parties = [{"rank": r["rank"], "role": r["role"], "pid": r["pid"], "held": r["held"],
                "fingerprints": set(r["fingerprints"]), "received_weights": r["weights"] is not None}
               for r in results]
    return TrainResult(model=trained.eval(), costs=combine_summaries([r["costs"] for r in results]),
                       provider=results.provider, seconds=results.seconds,
                       epoch_seconds=[max(e) for e in zip(*(r["epoch_seconds"] for r in results), strict=True)],
                       parties=parties)
