"""CrypTen import shim: works in a fresh interpreter, is idempotent, explains a missing install.

Every check runs in a fresh subprocess: the shim only matters before crypten's first import,
and privml must never leave crypten imported in the caller's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shim_makes_crypten_importable_and_is_idempotent():
    out = last_json(run_python("""
        import importlib.util, json, sys
        import torch
        old = "torch.onnx._internal.registration"
        new = "torch.onnx._internal.torchscript_exporter.registration"
        had_old = importlib.util.find_spec(old) is not None
        from privml.parties.compat import apply_torch_onnx_shim, import_crypten
        first = apply_torch_onnx_shim()
        second = apply_torch_onnx_shim()          # idempotent: nothing left to do
        import crypten                            # the plain import now works
        c1 = import_crypten()
        c2 = import_crypten()
        print(json.dumps({
            "had_old": had_old, "first": first, "second": second,
            "same_module": c1 is c2 is crypten, "version": crypten.__version__,
            "alias_ok": had_old or sys.modules[old] is sys.modules[new],
            "has_init": callable(crypten.init), "has_cryptensor": callable(crypten.cryptensor),
        }))
    """))
    assert out["version"] == "0.4.1"
    assert out["same_module"] and out["has_init"] and out["has_cryptensor"]
    assert out["second"] is False
    # On torch >= 2.9 the old module is gone and the first call must alias it.
    assert out["first"] is (not out["had_old"])
    assert out["alias_ok"]


def test_plain_import_fails_without_shim_on_this_torch():
    """Documents why the shim exists; skips once torch (or crypten) no longer needs it."""
    proc = run_python("""
        import importlib.util, torch
        if importlib.util.find_spec("torch.onnx._internal.registration") is not None:
            print("NOT-NEEDED")
        else:
            import crypten
    """)
    if "NOT-NEEDED" in proc.stdout:
        pytest.skip("this torch still has torch.onnx._internal.registration")
    assert proc.returncode != 0
    assert "torch.onnx._internal.registration" in proc.stderr


BLOCKER = """
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == {blocked!r} or name.startswith({blocked!r} + "."):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize("blocked", ["crypten", "omegaconf"])
def test_missing_install_raises_backend_unavailable_with_commands(blocked):
    out = last_json(run_python(BLOCKER.format(blocked=blocked) + """
    import json
    from privml.errors import BackendUnavailable, PrivmlError
    from privml.parties.compat import import_crypten
    try:
        import_crypten()
        result = {"raised": None}
    except BackendUnavailable as exc:
        result = {"raised": "BackendUnavailable", "msg": str(exc),
                  "is_import_error": isinstance(exc, ImportError), "is_privml": isinstance(exc, PrivmlError)}
    print(json.dumps(result))
    """))
    assert out["raised"] == "BackendUnavailable"
    assert out["is_import_error"] and out["is_privml"]
    assert "pip install --no-deps crypten==0.4.1" in out["msg"]
    assert "pip install omegaconf onnx pyyaml" in out["msg"]
    assert blocked in out["msg"]


def test_run_parties_without_crypten_fails_fast_in_the_parent():
    out = last_json(run_python(BLOCKER.format(blocked="crypten") + """
    import json
    from privml.errors import BackendUnavailable
    from privml.parties.launcher import run_parties
    try:
        run_parties(print, 2, timeout=5)
        result = {"raised": None}
    except BackendUnavailable as exc:
        result = {"raised": "BackendUnavailable", "msg": str(exc)}
    print(json.dumps(result))
    """))
    assert out["raised"] == "BackendUnavailable"
    assert "pip install --no-deps crypten==0.4.1" in out["msg"]


def test_importing_privml_never_imports_crypten_or_tenseal():
    out = last_json(run_python("""
        import json, sys
        import privml, privml.mpc, privml.parties.compat, privml.parties.launcher, privml.parties.costs
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("crypten", "tenseal"))
        print(json.dumps({"loaded": loaded}))
    """))
    assert out["loaded"] == []
