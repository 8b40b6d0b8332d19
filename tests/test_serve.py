"""``privml serve`` and ``privml.Client`` over real loopback HTTP(S), with real CKKS ciphertexts.

The service runs as its own process (``privml serve BUNDLE``), started from a bundle: no recompilation. The
tests check results against the clear compiled model, and that the service survives oversize, malformed,
abandoned and stalled requests and keeps serving others; that TLS is verified; that forged responses are
refused by the client; and that logs are structured and carry no key material.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn

import privml
from privml.config import ServeConfig
from privml.errors import InvalidInput, MalformedInput, ServiceError
from privml.serve import ServiceProcess as Service
from privml.serve import check_listen

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-3


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 10)).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    compiled = privml.compile(_cnn(), x, backend="ckks")
    paths = privml.save(compiled, tmp_path_factory.mktemp("serve") / "b")
    return compiled, x, paths


@pytest.fixture(scope="module")
def service(bundle):
    _, _, paths = bundle
    svc = Service(paths.server, "--max-request-mb", "4", "--max-upload-mb", "40", "--read-timeout", "3",
                  "--workers", "2")
    yield svc
    svc.stop()


def _url(svc: Service, scheme: str | None = None) -> str:
    return svc.url if scheme is None else f"{scheme}://127.0.0.1:{svc.port}"


def _post(port: int, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"raw": len(data)}
    finally:
        conn.close()


def test_client_results_match_the_clear_model_and_keys_go_once(bundle, service):
    compiled, x, paths = bundle
    with privml.Client(_url(service), paths.client) as client:
        y1 = client.infer(x[:2])
        keys_after_first = client.bytes_keys
        y2 = client.infer(x[2:5])
        assert client.bytes_keys == keys_after_first > 0  # uploaded once
        assert client.requests == 2 and 0 < client.bytes_requests < keys_after_first
    assert (y1 - compiled(x[:2])).abs().max() < TOL
    assert (y2 - compiled(x[2:5])).abs().max() < TOL
    metrics = privml.Client(_url(service), paths.client).metrics()
    assert metrics["requests"] >= 2 and metrics["latency_ms"]["p95"] is not None


def test_concurrent_clients_each_get_their_own_results(bundle, service):
    compiled, x, paths = bundle
    clients = [privml.Client(_url(service), paths.client) for _ in range(3)]
    batches = [x[3 * i:3 * i + 2] for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda cb: cb[0].infer(cb[1]), zip(clients, batches, strict=True)))
    for got, xb in zip(results, batches, strict=True):
        assert (got - compiled(xb)).abs().max() < TOL
    assert len({c.key_id for c in clients}) == 3
    for c in clients:
        c.close()


def test_oversize_malformed_and_unknown_requests_are_refused_and_service_goes_on(bundle, service):
    compiled, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    key_id = client.upload_keys()
    status, body = _post(service.port, f"/v1/infer/{key_id}", b"\0" * 5_000_000)
    assert status == 413 and "exceeds the limit" in body["error"]
    status, body = _post(service.port, "/v1/keys", b"\0" * 41_000_000)
    assert status == 413
    status, body = _post(service.port, f"/v1/infer/{key_id}", b"garbage" * 100)
    assert status == 400 and "privml" in body["error"]
    status, body = _post(service.port, "/v1/keys", b"garbage" * 100)
    assert status == 400
    status, body = _post(service.port, "/v1/infer/" + "0" * 32, b"x")
    assert status == 404 and "upload the evaluation keys" in body["error"]
    # a context holding the secret key is refused: the server never holds one
    from privml.he.serialize import dump_context

    secret = dump_context(client.session.backend.ctx, include_secret=True)
    status, body = _post(service.port, "/v1/keys", secret)
    assert status == 400 and "secret key" in body["error"]
    # a request truncated in the middle of its ciphertexts
    request = client.session.backend.dumps(client.session.encrypt(x[:1]))
    status, body = _post(service.port, f"/v1/infer/{key_id}", request[: len(request) // 2])
    assert status == 400
    assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL  # still serving
    errors = client.metrics()["errors"]
    assert errors.get("413", 0) >= 2 and errors.get("400", 0) >= 4


def test_abandoned_and_stalled_uploads_do_not_stop_the_service(bundle, service):
    compiled, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    key_id = client.upload_keys()
    before = client.metrics()["abandoned"]
    # disconnects mid-upload: announces 3 MB, sends 1 MB, closes
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(f"POST /v1/infer/{key_id} HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n".encode())
        s.sendall(b"\0" * 1_000_000)
    # stalls: announces a body and sends nothing for longer than --read-timeout (3 s)
    with socket.create_connection(("127.0.0.1", service.port)) as s:
        s.sendall(f"POST /v1/infer/{key_id} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode())
        s.settimeout(30)
        answer = s.recv(4096).decode()
    assert " 408 " in answer.splitlines()[0]
    assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL
    deadline = time.monotonic() + 10
    while client.metrics()["abandoned"] <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.metrics()["abandoned"] > before


def test_client_refuses_forged_responses_and_other_plans(bundle, service, monkeypatch):
    compiled, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    client.infer(x[:3])  # the session has encrypted a batch of 3: a response of 3 rows would pass its own check
    key_id = client.key_id
    request3 = client.session.backend.dumps(client.session.encrypt(x[:3]))
    _, _, response3 = client._call("POST", f"/v1/infer/{key_id}", request3)
    real_call = client._call

    def forged(method, path, body=None, headers=None):
        if path.startswith("/v1/infer/"):
            return 200, {"x-privml-request-sha256": hashlib.sha256(body).hexdigest()}, response3
        return real_call(method, path, body, headers)

    monkeypatch.setattr(client, "_call", forged)
    with pytest.raises(MalformedInput, match="3 samples for a request of 2"):
        client.infer(x[:2])

    def unbound(method, path, body=None, headers=None):
        status, hdrs, data = real_call(method, path, body, headers)
        return status, {**hdrs, "x-privml-request-sha256": "0" * 64}, data

    monkeypatch.setattr(client, "_call", unbound)
    with pytest.raises(MalformedInput, match="does not answer this request"):
        client.infer(x[:2])
    other = privml.compile(_cnn(seed=3), x, backend="ckks")
    with pytest.raises(MalformedInput, match="another plan"):
        privml.Client(_url(service), other.plan).infer(x[:1])


@pytest.mark.slow  # ~25 s: a worker process killed and restarted
def test_a_dead_worker_is_restarted_and_its_clients_upload_again(bundle, service):
    import psutil

    compiled, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    client.infer(x[:1])
    workers = [p for p in psutil.Process(service.proc.pid).children()
               if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2 and client.metrics()["workers"] == 2
    # killed during a request: that request fails with 503, the worker is restarted
    running = ThreadPoolExecutor(1).submit(client.infer, x[:8])
    deadline = time.monotonic() + 30
    while client.metrics()["in_flight"] == 0 and time.monotonic() < deadline and not running.done():
        time.sleep(0.01)
    for w in workers:
        w.kill()
    with pytest.raises(ServiceError, match="worker died") as err:
        running.result()
    assert err.value.status == 503
    uploaded = client.bytes_keys
    assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL  # keys uploaded again, transparently
    assert client.bytes_keys == 2 * uploaded
    # killed between requests: the next request finds it dead, restarts it and gets 404, the client re-uploads
    psutil.wait_procs(workers, timeout=10)
    live = [p for p in psutil.Process(service.proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    for w in live:
        w.kill()
    psutil.wait_procs(live, timeout=10)
    assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL
    assert client.bytes_keys == 3 * uploaded
    alive = [p for p in psutil.Process(service.proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(alive) == 2 and not {p.pid for p in alive} & {w.pid for w in workers + live}


def test_keys_dropped_by_the_server_are_uploaded_again(bundle, service):
    compiled, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    client.infer(x[:1])
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    conn.request("DELETE", f"/v1/keys/{client.key_id}")
    assert conn.getresponse().status == 200
    uploaded = client.bytes_keys
    assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL
    assert client.bytes_keys == 2 * uploaded


def test_logs_are_structured_and_carry_no_key_material(bundle, service):
    _, x, paths = bundle
    client = privml.Client(_url(service), paths.client)
    client.infer(x[:1])
    context = client.session.backend.public_context()
    probe = context[len(context) // 2:len(context) // 2 + 24]
    records = [json.loads(line) for line in service.lines if line.startswith("{")]
    assert records and all("event" in r and "ts" in r for r in records)
    assert {"listening", "keys", "infer"} <= {r["event"] for r in records}
    text = "\n".join(service.lines)
    assert probe.hex() not in text and max(len(line) for line in service.lines) < 1000


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privml test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_is_verified_and_a_busy_service_says_so(bundle, tmp_path):
    compiled, x, paths = bundle
    cert, key = _self_signed(tmp_path)
    svc = Service(paths.server, "--tls-cert", str(cert), "--tls-key", str(key), "--queue", "0")
    try:
        client = privml.Client(_url(svc), paths.client, ca_file=cert)
        assert (client.infer(x[:2]) - compiled(x[:2])).abs().max() < TOL
        with pytest.raises(ServiceError, match="TLS|certificate"):
            privml.Client(_url(svc), paths.client).infer(x[:1])  # no pinned certificate
        with pytest.raises(ServiceError, match="cannot reach|TLS"):
            privml.Client(_url(svc, "http"), paths.client).infer(x[:1])  # clear HTTP to a TLS port
        # queue=0 with one slot: while one request runs, another is told the service is busy (503)
        clients = [client] + [privml.Client(_url(svc), paths.client, ca_file=cert) for _ in range(3)]
        for c in clients:
            c.upload_keys()
        big = x[:24]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(c.infer, big) for c in clients]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result())
                except ServiceError as err:
                    outcomes.append(err.status)
        statuses = [o for o in outcomes if isinstance(o, int)]
        results = [o for o in outcomes if isinstance(o, torch.Tensor)]
        assert 503 in statuses and results
        for got in results:
            assert (got - compiled(big)).abs().max() < TOL
        assert client.metrics()["rejected_busy"] >= 1
    finally:
        svc.stop()


def test_clear_http_beyond_loopback_is_refused():
    with pytest.raises(InvalidInput, match="refusing clear HTTP"):
        check_listen(ServeConfig(host="0.0.0.0"))
    assert check_listen(ServeConfig(host="0.0.0.0", insecure_http=True)) is None
    with pytest.raises(InvalidInput, match="both"):
        check_listen(ServeConfig(tls_cert="a.pem"))


def test_service_refuses_mpc_bundles(tmp_path):
    from privml.serve import InferenceService

    torch.manual_seed(0)
    compiled = privml.compile(nn.Sequential(nn.Linear(4, 2)), torch.randn(16, 4), backend="plain")
    with pytest.raises(InvalidInput, match="ckks and hybrid"):
        InferenceService(compiled, ServeConfig())


def test_hybrid_bundle_served_with_the_clients_enclave(tmp_path):
    """Hybrid: the client's session provisions its key to its enclave; the service refreshes through it."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(128, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = privml.compile(model, x, backend="hybrid", flooding="refresh")
    paths = privml.save(compiled, tmp_path / "hy")
    svc = Service(paths.server)
    try:
        status, body = _post(svc.port, "/v1/keys", b"context bytes")
        assert status == 400 and "X-Privml-Credentials" in body["error"]
        with privml.Client(_url(svc), paths.client) as client:
            got = client.infer(x[:3])
            assert (got - compiled(x[:3])).abs().max() < 0.05
            assert (got.argmax(1) == compiled(x[:3]).argmax(1)).all()
    finally:
        svc.stop()


def test_clients_of_one_plan_share_the_encoded_weights(bundle):
    """Two clients' servers in one process: the second shares the first's linear maps and encoded diagonals
    (they depend on the plan only), encodes nothing at its warm-up, and each client decrypts its own result."""
    from privml.backends.ckks import CKKSServer, dumps, loads
    from privml.he.context import CKKSContext
    from privml.he.params import choose_params
    from privml.serve_pool import ThreadEvaluator

    compiled, x, _ = bundle
    sessions = [privml.Session(compiled.plan) for _ in range(2)]
    evaluator = ThreadEvaluator(compiled, warm_up=True, concurrency=2)
    try:
        for i, s in enumerate(sessions):
            evaluator.add(f"k{i}", s.backend.public_context(), None)
        first, second = (evaluator._servers[f"k{i}"][0] for i in range(2))
        assert second.ctx._encoder.cache is first.ctx._encoder.cache and first.ctx._encoder.cache.items
        assert second.runtime._matvec_cache is first.runtime._matvec_cache
        for i, s in enumerate(sessions):
            out = evaluator.run(f"k{i}", dumps(s.encrypt(x[i:i + 2])))
            got = s.decrypt(loads(out, s.backend.runtime))
            assert (got - compiled(x[i:i + 2])).abs().max() < TOL
        assert second.ctx.stats["encodes"] == 0  # every diagonal came from the first client's warm-up
        other = privml.Plan.from_json(compiled.plan.to_json())
        other.params["output_range"] = [-1.0, 1.0]  # another compilation of the same architecture
        with pytest.raises(InvalidInput, match="same plan"):
            CKKSServer(other, sessions[0].backend.public_context(), like=first)
        small = CKKSContext.generate(choose_params(1, precision_bits=8, poly_modulus_degree=4096))
        with pytest.raises(InvalidInput, match="equal CKKS parameters"):
            small.share_plaintexts(first.ctx)
    finally:
        evaluator.close()
