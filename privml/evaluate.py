"""Private evaluation on a labelled test set: one backend (``evaluate``) or several side by side (``run_eval``).

``evaluate`` runs a compiled model request by request (the batch follows the backend: the whole split for plain,
MPC and the throughput layout, one sample for the latency layout), with a progress bar in samples/s and ETA,
and records what the report needs: per-request timings, predictions, per-layer time and backend costs, sizes,
peak memory and CPU time. Given a ``store`` directory it saves every finished request there and, run again on
the same directory, skips them: an interrupted evaluation resumes without redoing finished work.

Several backends side by side, run directories and manifests: :mod:`privml.runs`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from privml.compiler.api import CompiledModel
from privml.errors import InvalidInput
from privml.eval_config import DEFAULT_WATTS_PER_CORE
from privml.report import EvalReport, environment, latency_stats, wilson_interval
from privml.session import RangeWarning, Session

MONITOR_INTERVAL_S = 0.05


def default_batch_size(plan: Any, n: int) -> int:
    """Samples per request the backend packs best: one per ciphertext slot group, one image for latency layouts."""
    if plan.backend in ("ckks", "hybrid"):
        if plan.params.get("layout") != "throughput":
            return 1
        capacity = plan.params.get("lanes") or int(plan.params["poly_modulus_degree"]) // 2
        return max(1, min(n, int(capacity)))
    return max(1, n)  # plain: no packing; mpc: one launch of the parties for the whole split


# ------------------------------------------------------------------------------------------------ measuring


class _Monitor:
    """Peak RSS of this process and its children (sampled), and CPU seconds, between start and stop."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self.proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _Monitor:
        self.cpu0 = self._cpu()
        self.start = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.cpu_seconds = self._cpu() - self.cpu0


class _LayerTimer:
    """Seconds and backend op counts per leaf module of a compiled model, over the calls it watches."""

    def __init__(self, module: torch.nn.Module, counters: Any) -> None:
        self.counters = counters  # () -> {name: count} of the backend, read before and after each module
        self.rows: dict[str, dict[str, float]] = {}
        self._open: dict[str, tuple[float, dict[str, int]]] = {}
        self._handles = []
        for name, mod in module.named_modules():
            if name and not any(True for _ in mod.children()):
                self._handles.append(mod.register_forward_pre_hook(self._pre(name)))
                self._handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Any:
        def hook(*_: object) -> None:
            self._open[name] = (time.perf_counter(), self.counters())
        return hook

    def _post(self, name: str) -> Any:
        def hook(*_: object) -> None:
            t0, s0 = self._open.pop(name, (time.perf_counter(), {}))
            row = self.rows.setdefault(name, {"seconds": 0.0})
            row["seconds"] += time.perf_counter() - t0
            for k, v in self.counters().items():
                if v - s0.get(k, 0):
                    row[k] = row.get(k, 0) + v - s0.get(k, 0)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _counter_delta(before: Any, after: Any) -> Any:
    """The counters that grew between two ``costs()`` snapshots (nested dicts), as increments."""
    if isinstance(after, dict):
        out = {}
        for k, v in after.items():
            d = _counter_delta(before.get(k) if isinstance(before, dict) else None, v)
            if d not in (None, {}):
                out[k] = d
        return out
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        base = before if isinstance(before, (int, float)) and not isinstance(before, bool) else 0
        return after - base if after > base else None
    return None


def _add(total: dict, inc: dict) -> dict:
    for k, v in inc.items():
        total[k] = _add(dict(total.get(k) or {}), v) if isinstance(v, dict) else total.get(k, 0) + v
    return total


def _with_counters(static: Any, counters: dict) -> Any:
    """``costs()``'s last snapshot with every counter replaced by its total over all requests (resumed ones too)."""
    if not isinstance(static, dict):
        return static
    out = dict(static)
    for k, v in counters.items():
        out[k] = _with_counters(out.get(k), v) if isinstance(v, dict) else (round(v, 6) if isinstance(v, float) else v)
    return out


# ------------------------------------------------------------------------------------------------ resumable store


class BatchStore:
    """Finished requests of one backend run, one file each, so an interrupted evaluation resumes."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, start: int) -> Path:
        return self.dir / f"request_{start:07d}.pt"

    def load(self, start: int, size: int) -> dict[str, Any] | None:
        path = self._path(start)
        if not path.is_file():
            return None
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a request interrupted while being written: redo it
            return None
        ok = isinstance(rec, dict) and rec.get("size") == size and isinstance(rec.get("logits"), torch.Tensor)
        return rec if ok and rec["logits"].shape[0] == size else None

    def save(self, start: int, record: dict[str, Any]) -> None:
        tmp = self._path(start).with_suffix(".tmp")
        torch.save(record, tmp)
        tmp.replace(self._path(start))  # atomic: a kill leaves either nothing or the whole request

    def meta(self) -> dict[str, Any]:
        path = self.dir / "session.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_meta(self, meta: dict[str, Any]) -> None:
        (self.dir / "session.json").write_text(json.dumps(meta, default=str))


# ------------------------------------------------------------------------------------------------ one backend


def evaluate(compiled: CompiledModel, reference: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             name: str = "model", batch_size: int | None = None, session: Session | None = None,
             progress: bool = True, store: str | Path | None = None, label: str | None = None,
             tolerance: float = 0.01, confidence: float = 0.95, watts_per_core: float = DEFAULT_WATTS_PER_CORE,
             simulate: bool = False, stop_after: int | None = None, **session_options: Any) -> EvalReport:
    """Run ``compiled`` privately on ``x`` request by request and compare with ``reference`` in clear.

    The clear accuracy is the *original* model's (before any approximation), so the report shows the full cost
    of going private. Samples whose inputs or outputs leave their calibrated ranges are evaluated anyway and
    listed in the report (``out_of_range_inputs``/``_outputs``), with one warning. ``store``: a directory where
    finished requests are saved and, on a second call, reused. ``stop_after``: stop (``KeyboardInterrupt``) after
    that many new requests, as an interruption would. ``simulate``: also predict the result in clear with the
    backend's noise model (plain backend simulation) and say how far it was from the private run.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise InvalidInput(f"privml: evaluate needs as many labels as inputs (>= 1), got {x.shape[0]} inputs and "
                           f"{y.shape[0]} labels")
    n = int(x.shape[0])
    batch_size = batch_size or default_batch_size(compiled.plan, n)
    reference = reference.eval()
    with torch.no_grad():
        clear_logits = reference(x).float()
        approx_logits = compiled(x).float()  # the compiled (approximated) model in clear
    st = BatchStore(store) if store is not None else None
    starts = list(range(0, n, batch_size))
    done = {s: st.load(s, min(batch_size, n - s)) for s in starts} if st else {}
    todo = [s for s in starts if not done.get(s)]
    meta = st.meta() if st else {}
    if todo:
        meta = _run_requests(compiled, x, batch_size, todo, done, st, session, session_options, progress, label,
                             stop_after, watts_per_core, prior=meta)
    records = [done[s] for s in starts]
    private_logits = torch.cat([r["logits"] for r in records]).float()
    flagged_in = sorted(i for r in records for i in r["flagged_in"])
    flagged_out = sorted(i for r in records for i in r["flagged_out"])
    if flagged_in or flagged_out:
        warnings.warn(f"privml: {len(flagged_in)} sample(s) had inputs and {len(flagged_out)} outputs outside their "
                      "calibrated ranges; their private results may be wrong (listed in the report).", RangeWarning,
                      stacklevel=2)
    timings = [[int(s), int(r["size"]), float(r["seconds"])] for s, r in zip(starts, records, strict=True)]
    counters: dict[str, Any] = {}
    layer_rows: dict[str, dict[str, float]] = {}
    for r in records:
        _add(counters, r["cost_increment"])
        _add(layer_rows, r["layers"])
    report = _report(compiled, name, label, y, clear_logits, approx_logits, private_logits, flagged_in, flagged_out,
                     timings, meta, counters, layer_rows, batch_size, tolerance, confidence, watts_per_core,
                     session_options)
    report.resumed_requests = len(starts) - len(todo)
    report.resources["cpu_seconds"] = round(sum(float(r["cpu_seconds"]) for r in records) + meta.get("setup_cpu", 0),
                                            3)
    _energy(report.resources, watts_per_core)
    if simulate and compiled.plan.backend != "plain":
        report.simulation = simulated(compiled, x, y, private_logits)
    return report


def _run_requests(compiled: CompiledModel, x: torch.Tensor, batch_size: int, todo: list[int], done: dict,
                  st: BatchStore | None, session: Session | None, session_options: dict, progress: bool,
                  label: str | None, stop_after: int | None, watts_per_core: float, prior: dict) -> dict[str, Any]:
    """Run the requests ``todo`` (starts) in one session; fills ``done``; returns the session's metadata."""
    n = int(x.shape[0])
    own = session is None
    with _Monitor() as mon:
        t0 = time.perf_counter()
        if session is None:  # its own session, started: MPC parties stay up for every request
            session = Session(compiled.plan, **{"out_of_range": "warn", **session_options}).start()
        setup = time.perf_counter() - t0
        backend = session.backend
        counters = _op_counters(backend)
        meta: dict[str, Any] = {"setup_seconds": prior.get("setup_seconds", 0.0) + setup,
                                "sizes": dict(prior.get("sizes", {})), "provenance": {}}
        try:
            meta["sizes"].update(_sizes(backend))
            remaining = sum(min(batch_size, n - s) for s in todo)
            bar = tqdm(total=remaining, desc=f"private eval [{label or compiled.plan.backend}]", unit="sample",
                       disable=not progress, smoothing=0.1)
            before = _costs(backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RangeWarning)  # summarised once by the caller
                for k, start in enumerate(todo):
                    if stop_after is not None and k >= stop_after:
                        raise KeyboardInterrupt(f"stopped after {stop_after} requests (stop_after)")
                    xb = x[start:start + batch_size]
                    timer = _LayerTimer(compiled.module, counters)
                    cpu0 = mon._cpu()
                    t = time.perf_counter()
                    try:
                        enc = session.encrypt(xb)
                        flagged_in = [start + j for j in session.last_out_of_range]
                        out = compiled(enc)
                        if k == 0 and hasattr(backend, "dumps"):
                            meta["sizes"].update(request_bytes=len(backend.dumps(enc)),
                                                 response_bytes=len(backend.dumps(out)),
                                                 request_samples=int(xb.shape[0]))
                        logits = session.decrypt(out)
                    finally:
                        timer.close()
                    seconds = time.perf_counter() - t
                    after = _costs(backend)
                    rec = {"size": int(xb.shape[0]), "logits": logits.detach().float().clone(),
                           "seconds": seconds, "cpu_seconds": mon._cpu() - cpu0, "flagged_in": flagged_in,
                           "flagged_out": [start + j for j in session.last_out_of_range],
                           "layers": timer.rows, "cost_increment": _counter_delta(before, after)}
                    before = after
                    done[start] = rec
                    if st:
                        st.save(start, rec)
                    bar.update(rec["size"])
            bar.close()
            meta["costs"] = before
            meta["provenance"] = _provenance(backend)
            meta["visibility"] = list(getattr(backend, "visibility", lambda: [])())
            meta["attacker_model"] = str(getattr(backend, "attacker_model", lambda: "")())
            meta["trust"] = list(getattr(backend, "trust_statement", lambda: [])())
        finally:
            if own:
                session.close()  # a session it opened (hybrid: the enclave it started)
    meta["peak_rss_gb"] = max(prior.get("peak_rss_gb", 0.0), mon.peak / 1e9)
    meta["rss_at_start_gb"] = prior.get("rss_at_start_gb", mon.start / 1e9)
    meta["setup_cpu"] = prior.get("setup_cpu", 0.0) + max(0.0, mon.cpu_seconds - sum(
        float(done[s]["cpu_seconds"]) for s in todo if s in done))
    if st:
        st.save_meta(meta)
    return meta


def _op_counters(backend: Any) -> Any:
    """A function reading the backend's op counters: CKKS op counts, and the enclave refreshes' traffic (hybrid)."""

    def read() -> dict[str, float]:
        out: dict[str, float] = dict(getattr(getattr(backend, "ctx", None), "stats", None) or {})
        refresher = getattr(getattr(backend, "runtime", None), "refresher", None)
        if refresher is not None:  # re-read each time: a rekey replaces the runtime
            st = refresher.stats
            out.update(refreshes=st.requests, refresh_bytes=st.bytes_sent + st.bytes_received)
        return out

    return read


def _costs(backend: Any) -> dict[str, Any]:
    return dict(getattr(backend, "costs", lambda: {})())


def _sizes(backend: Any) -> dict[str, Any]:
    """Key and context sizes the client uploads once (CKKS, hybrid)."""
    out: dict[str, Any] = {}
    if hasattr(backend, "public_context"):
        size = getattr(backend, "public_context_bytes", None)
        out["public_context_bytes"] = size() if size else len(backend.public_context())
        out["galois_keys"] = len(getattr(backend.ctx, "rotation_steps", []))
    return out


def _provenance(backend: Any) -> dict[str, Any]:
    """The enclave's measurement, attestation document and verified audit-log head (hybrid)."""
    att = getattr(backend, "attestation", None)
    if att is None or not hasattr(backend, "audit"):
        return {}
    from privml.enclave.audit import entry_hash

    entries = backend.audit()
    return {"enclave_pcr0": att.pcrs[0].hex(), "enclave_region": att.region, "enclave_module": att.module_id,
            "attestation_document": att.document.hex(), "audit_log_entries": len(entries),
            "audit_log_head": entry_hash(entries[-1]).hex() if entries else "empty (genesis)"}


def _energy(res: dict[str, Any], watts_per_core: float) -> None:
    res["watts_per_core"] = watts_per_core
    res["energy_j"] = round(res.get("cpu_seconds", 0.0) * watts_per_core, 3)
    res["energy_wh"] = res["energy_j"] / 3600
    res["assumption"] = (f"CPU seconds (this process and its children: parties, enclave, dealer; measured by psutil) "
                         f"x {watts_per_core:g} W per busy core; idle power, memory and network are not counted.")


def _layers(compiled: CompiledModel, measured: dict[str, dict[str, float]], costs: dict[str, Any],
            total_seconds: float) -> list[dict[str, Any]]:
    """Per-layer rows: the plan's op, approximation, levels and estimated error, plus what the run measured."""
    mpc_layers = costs.get("layers") if isinstance(costs.get("layers"), dict) else {}
    rows, seen = [], set()
    for lp in compiled.plan.layers:
        row: dict[str, Any] = {"layer": lp.name, "op": lp.op, "approximation": lp.approx}
        if lp.degree:
            row["degree"] = lp.degree
        if compiled.plan.backend in ("ckks", "hybrid"):
            row["levels"] = lp.depth
        row["est. approx error"] = lp.est_error
        for key, value in {**measured.get(lp.name, {}), **mpc_layers.get(lp.name, {})}.items():
            row[key] = round(value, 4) if isinstance(value, float) else value
        seen.add(lp.name)
        rows.append(row)
    for name, extra in mpc_layers.items():  # <share ...>, <open ...> steps of the parties
        if name not in seen:
            rows.append({"layer": name or "<root>", "op": "protocol step",
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in extra.items()}})
    timed = sum(float(r.get("seconds", 0.0)) for r in rows)
    if rows and total_seconds > timed:
        what = "starting the parties, sharing, collecting" if mpc_layers else "encrypt, decrypt, functional ops"
        rows.append({"layer": "(rest)", "op": what, "seconds": round(total_seconds - timed, 4)})
    return rows


def _report(compiled: CompiledModel, name: str, label: str | None, y: torch.Tensor, clear_logits: torch.Tensor,
            approx_logits: torch.Tensor, private_logits: torch.Tensor, flagged_in: list[int], flagged_out: list[int],
            timings: list[list[float]], meta: dict[str, Any], counters: dict[str, Any],
            layer_rows: dict[str, dict[str, float]], batch_size: int, tolerance: float, confidence: float,
            watts_per_core: float, session_options: dict[str, Any]) -> EvalReport:
    n = int(y.shape[0])
    clear_pred, private_pred = clear_logits.argmax(1), private_logits.argmax(1)
    clear_ok, private_ok = int((clear_pred == y).sum()), int((private_pred == y).sum())
    lat = latency_stats(timings)
    costs = _with_counters(meta.get("costs", {}), counters)
    plan = compiled.plan
    drop = (clear_ok - private_ok) / n
    lo, hi = wilson_interval(private_ok, n, confidence)
    verdict = ("PASS" if drop <= tolerance + 1e-12 else "FAIL") + (
        f": private accuracy {100 * private_ok / n:.2f}% vs clear {100 * clear_ok / n:.2f}% (a drop of "
        f"{100 * drop:.2f} points; tolerance {100 * tolerance:.2f}). On {n} samples the "
        f"{round(100 * confidence)}% interval is [{100 * lo:.1f}%, {100 * hi:.1f}%]"
        + (": too wide to tell a drop this small apart" if hi - lo > 2 * max(tolerance, 1e-9) else "") + ".")
    options = {"batch_size": batch_size, **{k: str(v) for k, v in session_options.items()}, **plan.options}
    if plan.params.get("layout"):
        options["layout"] = plan.params["layout"]
    return EvalReport(
        model=name, backend=plan.backend, label=label or plan.backend, samples=n,
        clear_accuracy=clear_ok / n, private_accuracy=private_ok / n,
        agreement=float((clear_pred == private_pred).float().mean()),
        max_abs_logit_error=float((clear_logits - private_logits).abs().max()),
        encryption_error=float((approx_logits - private_logits).abs().max()),
        approximation_error=float((approx_logits - clear_logits).abs().max()),
        confidence=confidence, clear_interval=wilson_interval(clear_ok, n, confidence), private_interval=(lo, hi),
        tolerance=tolerance, verdict=verdict, latency=lat, setup_seconds=round(meta.get("setup_seconds", 0.0), 3),
        resources={"peak_rss_gb": round(meta.get("peak_rss_gb", 0.0), 3),
                   "rss_at_start_gb": round(meta.get("rss_at_start_gb", 0.0), 3)}, sizes=dict(meta.get("sizes", {})),
        layers=_layers(compiled, layer_rows, costs, lat["total_s"]),
        out_of_range_inputs=flagged_in, out_of_range_outputs=flagged_out,
        seconds_total=lat["total_s"], seconds_per_sample=lat["total_s"] / n, options=options, costs=costs,
        visibility=meta.get("visibility", []), attacker_model=meta.get("attacker_model", ""),
        trust=meta.get("trust", []), timings=timings,
        plan_summary={"total_depth": plan.total_depth, "fixes": "; ".join(plan.fixes) or "none", **plan.params},
        predictions={"labels": y.tolist(), "clear": clear_pred.tolist(), "private": private_pred.tolist()},
        environment=environment(), provenance=dict(meta.get("provenance", {})))


def simulated(compiled: CompiledModel, x: torch.Tensor, y: torch.Tensor,
              private_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """The encrypted result predicted in clear with the backend's noise model (as Concrete ML's ``fhe="simulate"``).

    CKKS: Gaussian noise after every op at the plan's noise level; hybrid: at the flooding sigma (an upper
    estimate: it floods only at refreshes); MPC: CrypTen's 16-bit fixed point. With ``private_logits`` it also
    says how far the prediction was from the private run.
    """
    from privml.backends.plain import PlainBackend, Simulation
    from privml.compiler.api import noise_std
    from privml.compiler.client import apply_client_ops
    from privml.tensor import module_scope

    plan = compiled.plan
    if plan.backend == "mpc":
        sim, mode = Simulation("fixed_point"), "fixed point, 16 fractional bits"
    else:
        std = noise_std(plan, int(plan.options.get("precision_bits", 20) or 20))
        hy = plan.params.get("hybrid") or {}
        std = max(std, float(hy.get("flood_sigma") or 0.0), float(hy.get("release_sigma") or 0.0))
        sim, mode = Simulation("ckks", ckks_noise_std=std), f"Gaussian noise, std {std:.3g} after every op"
    backend = PlainBackend(sim)
    with torch.no_grad(), module_scope(compiled.module):
        out = compiled.module(backend.encrypt(x))
    logits = apply_client_ops(backend.decrypt(out) if hasattr(out, "payload") else out,
                              plan.params.get("client_ops", [])).float()
    pred = logits.argmax(1)
    result: dict[str, Any] = {"mode": mode, "accuracy": float((pred == y).float().mean())}
    if private_logits is not None:
        ppred = private_logits.argmax(1)
        result.update(max_abs_logit_difference=float((logits - private_logits).abs().max()),
                      prediction_agreement=float((pred == ppred).float().mean()),
                      accuracy_difference=result["accuracy"] - float((ppred == y).float().mean()))
    return result
