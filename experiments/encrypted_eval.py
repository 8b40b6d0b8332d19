"""Encrypted evaluation from a script: a thin wrapper over ``privml eval`` (same flags, same run directories).

    python experiments/encrypted_eval.py --eval-config configs/eval/digits_compare.yaml
    python experiments/encrypted_eval.py --config configs/breast_cancer_mlp.yaml --backend plain ckks mpc
    python experiments/encrypted_eval.py --resume artifacts/reports/<run>        # finish an interrupted run
"""

from __future__ import annotations

import sys

from privml.cli import main

if __name__ == "__main__":  # MPC parties are spawned processes: they re-import this file
    sys.exit(main(["eval", *sys.argv[1:]]))
