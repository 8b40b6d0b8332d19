"""privml.compile / Session end to end on the plain backend, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import privml
from privml.errors import CalibrationError, InvalidInput, UnsupportedModule


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10)).eval()


def test_compile_session_roundtrip_plain() -> None:
    model = _cnn()
    calib = torch.rand(64, 1, 8, 8)
    private = privml.compile(model, calib, backend="plain")
    session = privml.Session(private.plan)
    x = torch.rand(5, 1, 8, 8)
    x_enc = session.encrypt(x)
    assert isinstance(x_enc, torch.Tensor) and x_enc.shape == x.shape
    y = session.decrypt(private(x_enc))
    assert isinstance(y, torch.Tensor) and not isinstance(y, privml.tensor.PrivateTensor)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(private(x), model(x), rtol=1e-5, atol=1e-5)


def test_plan_table_and_json_roundtrip() -> None:
    private = privml.compile(_cnn(), torch.rand(32, 1, 8, 8))
    plan = private.plan
    text = str(plan)
    assert "Conv2d(1->4" in text and "Linear(64->10)" in text and "folded" in text
    relu = [lp for lp in plan.layers if lp.op == "ReLU"][0]
    assert relu.in_range is not None and relu.in_range[0] < 0 < relu.in_range[1]
    assert plan.input_shape == (1, 8, 8)
    again = privml.Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()


def test_bad_inputs_get_clear_errors() -> None:
    private = privml.compile(_cnn(), torch.rand(16, 1, 8, 8))
    session = privml.Session(private.plan)
    with pytest.raises(InvalidInput, match="shape"):
        session.encrypt(torch.rand(2, 1, 9, 9))
    with pytest.raises(InvalidInput, match="shape"):
        session.encrypt(torch.rand(1, 8, 8))
    with pytest.raises(InvalidInput, match="dtype"):
        session.encrypt(torch.ones(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(InvalidInput, match="NaN or inf"):
        session.encrypt(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(InvalidInput, match="NaN or inf"):
        private(torch.full((2, 1, 8, 8), float("inf")))
    with pytest.raises(InvalidInput, match="torch.Tensor"):
        session.encrypt([[1.0]])
    with pytest.raises(InvalidInput, match="shape"):
        private(torch.rand(2, 64))


def test_calibration_errors() -> None:
    model = _cnn()
    with pytest.raises(CalibrationError, match="empty"):
        privml.compile(model, torch.rand(0, 1, 8, 8))
    with pytest.raises(CalibrationError, match="empty"):
        privml.compile(model, [])
    with pytest.raises(CalibrationError, match="cannot run"):
        privml.compile(model, torch.rand(8, 3, 8, 8))
    with pytest.raises(CalibrationError, match="dtype"):
        privml.compile(model, torch.ones(8, 1, 8, 8, dtype=torch.int32))
    with pytest.raises(CalibrationError, match="NaN"):
        privml.compile(model, torch.full((8, 1, 8, 8), float("nan")))


def test_unsupported_model_errors_are_privml_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4))
    with pytest.raises(UnsupportedModule):
        privml.compile(model, torch.rand(4, 4))
    with pytest.raises(InvalidInput, match="nn.Module"):
        privml.compile("not a model", torch.rand(4, 4))


def test_dataloader_calibration() -> None:
    ds = torch.utils.data.TensorDataset(torch.rand(40, 1, 8, 8), torch.zeros(40, dtype=torch.long))
    private = privml.compile(_cnn(), torch.utils.data.DataLoader(ds, batch_size=16))
    assert private.plan.input_shape == (1, 8, 8)


def test_import_privml_loads_no_crypto_library() -> None:
    code = "import sys, privml; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tenseal', 'crypten')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_compile_is_callable_after_importing_submodules() -> None:
    import privml.compiler.plan  # noqa: F401

    assert callable(privml.compile)
