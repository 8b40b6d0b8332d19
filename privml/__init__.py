"""privml: run existing, unmodified PyTorch models privately (MPC, CKKS, hybrid enclave).

Public API: ``compile``, ``Session``, bundles (``save``, ``load_server``, ``load_client``), ``Client`` (for
``privml serve``), their typed configs (``CKKSConfig``, ``MPCSessionConfig``, ...:
:mod:`privml.config`), ``validate``, ``Plan``, ``errors``. Backends load
lazily: importing privml loads neither TenSEAL nor CrypTen.
"""

from privml import errors, functional
from privml.bundle import load_client, load_server, save
from privml.client import Client
from privml.compiler.api import CompiledModel
from privml.compiler.api import compile as compile  # noqa: PLW0622 - the public name is `privml.compile`
from privml.compiler.plan import Plan
from privml.compiler.validate import Problem, fix, validate
from privml.config import (
    BACKENDS,
    CKKSConfig,
    CKKSSessionConfig,
    CompileConfig,
    MPCConfig,
    MPCSessionConfig,
    PlainConfig,
    PlainSessionConfig,
    SessionConfig,
)
from privml.session import Session

__version__ = "0.1.0"
__all__ = ["compile", "Session", "save", "load_server", "load_client", "Client",
           "CompiledModel", "Plan", "Problem", "validate", "fix", "errors", "functional",
           "BACKENDS", "CompileConfig", "PlainConfig", "CKKSConfig", "MPCConfig", "SessionConfig", "PlainSessionConfig",
           "CKKSSessionConfig", "MPCSessionConfig", "__version__"]
