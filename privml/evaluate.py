"""Private evaluation of a compiled model on a labelled test set, producing an ``EvalReport``."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from privml.compiler.api import CompiledModel
from privml.report import EvalReport, environment
from privml.session import Session


def evaluate(compiled: CompiledModel, reference: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             name: str = "model", batch_size: int = 64, session: Session | None = None, progress: bool = True,
             **session_options: Any) -> EvalReport:
    """Run ``compiled`` privately on ``x`` batch by batch and compare with ``reference`` in clear.

    The clear accuracy is the *original* model's (before any approximation), so the report shows
    the full cost of going private.
    """
    session = session or Session(compiled.plan, **session_options)
    reference = reference.eval()
    with torch.no_grad():
        clear_logits = reference(x)
        approx_logits = compiled(x)  # the compiled (approximated) model in clear
    outputs = []
    start = time.perf_counter()
    batches = range(0, x.shape[0], batch_size)
    for i in tqdm(batches, desc=f"private eval [{compiled.plan.backend}]", disable=not progress, unit="batch"):
        xb = x[i:i + batch_size]
        outputs.append(session.decrypt(compiled(session.encrypt(xb))))
    seconds = time.perf_counter() - start
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
