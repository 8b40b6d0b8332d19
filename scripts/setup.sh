#!/usr/bin/env bash
# Create .venv with every dependency privml needs (idempotent: skips when already complete).
# Only packages are downloaded; no data set or model weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.privml-setup-done
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
echo "privml setup: creating .venv with $($PY --version)"
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# CrypTen 0.4.1's metadata asks for the withdrawn `sklearn` package: install it without deps;
# its real needs (omegaconf, onnx, pyyaml) come from pyproject.toml.
.venv/bin/python -m pip install -q --no-deps crypten==0.4.1
.venv/bin/python -c "import privml, tenseal; from privml.parties.compat import import_crypten; import_crypten()"
touch "$STAMP"
echo "privml setup: done"
