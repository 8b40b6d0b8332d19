"""Private evaluation of a compiled model on a labelled test set, producing an ``EvalReport``."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from tqdm.auto import tqdm

from privml.compiler.api import CompiledModel
from privml.report import EvalReport, environment
from privml.session import RangeWarning, Session


def evaluate(compiled: CompiledModel, reference: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             name: str = "model", batch_size: int = 64, session: Session | None = None, progress: bool = True,
             **session_options: Any) -> EvalReport:
    """Run ``compiled`` privately on ``x`` batch by batch and compare with ``reference`` in clear.

    The clear accuracy is the *original* model's (before any approximation), so the report shows
    the full cost of going private. Samples whose inputs or outputs leave their calibrated ranges are
    evaluated anyway and listed in the report (``out_of_range_inputs``/``_outputs``), with one warning.
    """
    own = session is None
    session = session or Session(compiled.plan, **{"out_of_range": "warn", **session_options})
    try:
        return _evaluate(compiled, reference, x, y, name, batch_size, session, progress, session_options)
    finally:
        if own:
            session.close()  # a session it opened (hybrid: the enclave it started)


def _evaluate(compiled: CompiledModel, reference: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, name: str,
              batch_size: int, session: Session, progress: bool, session_options: dict) -> EvalReport:
    reference = reference.eval()
    with torch.no_grad():
        clear_logits = reference(x)
        approx_logits = compiled(x)  # the compiled (approximated) model in clear
    outputs = []
    start = time.perf_counter()
    batches = range(0, x.shape[0], batch_size)
    flagged_in: list[int] = []
    flagged_out: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RangeWarning)  # summarised once below
        for i in tqdm(batches, desc=f"private eval [{compiled.plan.backend}]", disable=not progress, unit="batch"):
            enc = session.encrypt(x[i:i + batch_size])
            flagged_in += [i + j for j in session.last_out_of_range]
            outputs.append(session.decrypt(compiled(enc)))
            flagged_out += [i + j for j in session.last_out_of_range]
    seconds = time.perf_counter() - start
    if flagged_in or flagged_out:
        warnings.warn(f"privml: {len(flagged_in)} sample(s) had inputs and {len(flagged_out)} outputs outside their "
                      "calibrated ranges; their private results may be wrong (listed in the report).", RangeWarning,
                      stacklevel=2)
    private_logits = torch.cat(outputs).to(clear_logits.dtype)
    clear_pred, private_pred = clear_logits.argmax(1), private_logits.argmax(1)
    backend = session.backend
    return EvalReport(
        model=name,
        backend=compiled.plan.backend,
        samples=int(x.shape[0]),
        clear_accuracy=float((clear_pred == y).float().mean()),
        private_accuracy=float((private_pred == y).float().mean()),
        agreement=float((clear_pred == private_pred).float().mean()),
        max_abs_logit_error=float((clear_logits - private_logits).abs().max()),
        encryption_error=float((approx_logits - private_logits).abs().max()),
        approximation_error=float((approx_logits - clear_logits).abs().max()),
        out_of_range_inputs=flagged_in,
        out_of_range_outputs=flagged_out,
        seconds_total=seconds,
        seconds_per_sample=seconds / max(1, x.shape[0]),
        options={"batch_size": batch_size, **{k: str(v) for k, v in session_options.items()},
                 **compiled.plan.options},
        costs=dict(getattr(backend, "costs", lambda: {})()),
        trust=list(getattr(backend, "trust_statement", lambda: [])()),
        plan_summary={"total_depth": compiled.plan.total_depth, "fixes": "; ".join(compiled.plan.fixes) or "none",
                      **{k: v for k, v in compiled.plan.params.items()}},
        environment=environment(),
    )
