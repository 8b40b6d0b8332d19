"""A simulated trusted enclave (TEE) for the hybrid backend, in its own process.

The untrusted server computes on CKKS ciphertexts; when they run out of levels (or need an exact
ReLU) it sends them to the enclave, which holds the CKKS secret key and *refreshes* them: decrypt,
flood with Gaussian noise, re-encrypt at the top level.  The simulator follows AWS Nitro Enclaves
(COSE_Sign1 attestation with PCRs, a nonce, an ephemeral key and a certificate chain to a vendor
root; keys sealed to the measurement) so real hardware can replace it behind the same interface:
:mod:`~privml.enclave.protocol` (wire format), :mod:`~privml.enclave.attest`,
:mod:`~privml.enclave.provision`, :mod:`~privml.enclave.policy`, :mod:`~privml.enclave.audit`,
:mod:`~privml.enclave.server` (the process), :mod:`~privml.enclave.host` (launching it) and
:mod:`~privml.enclave.client`.

What the enclave sees. It must be trusted with the confidentiality of the secret key, and it holds
it. The values it decrypts are blinded by the server: additive random masks for a pure refresh
(the server subtracts the mask, homomorphically, afterwards), positive per-slot multiplicative masks
for an exact ReLU, since ``relu(m*x) = m*relu(x)`` for ``m > 0`` -- which still reveals each slot's
sign and the zero pattern. If the enclave is compromised, every ciphertext under its keys is
exposed. Side channels are the known weakness of SGX-class enclaves; blinding, constant work per
message, the per-key decryption budget, the rate limit, noise flooding (against IND-CPA-D key
recovery) and the hash-chained audit log the client verifies limit what a compromise or a
malicious server can get.
"""

from __future__ import annotations

from privml.enclave.attest import Attestation, EnclaveConfig, expected_measurement, verify_attestation
from privml.enclave.audit import verify_audit_log
from privml.enclave.client import EnclaveClient, Receipt, attest_and_provision
from privml.enclave.host import EnclaveProcess, launch
from privml.enclave.policy import Policy

__all__ = [
    "Attestation",
    "EnclaveClient",
    "EnclaveConfig",
    "EnclaveProcess",
    "Policy",
    "Receipt",
    "attest_and_provision",
    "expected_measurement",
    "launch",
    "verify_attestation",
    "verify_audit_log",
]
