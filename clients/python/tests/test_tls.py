"""TLS channels: root certificates as bytes or a path, ready credentials, and the failures."""

from __future__ import annotations

import shutil
import subprocess
from concurrent import futures

import grpc
import pytest

from stylealign_client import Client, StyleAlignError
from stylealign_client._pb.stylealign.v1 import stylealign_pb2 as pb
from stylealign_client._pb.stylealign.v1 import stylealign_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")


class Models(pb_grpc.StyleAlignServicer):
    def __init__(self):
        self.metadata = []

    def ListModels(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="over-tls")])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    servicer = Models()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_StyleAlignServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([((d / "key.pem").read_bytes(), (d / "cert.pem").read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield f"127.0.0.1:{port}", d / "cert.pem", servicer
    server.stop(grace=None)


def test_tls_with_root_certificates(tls_server):
    target, cert, servicer = tls_server
    for kwargs in (dict(root_certificates=cert), dict(root_certificates=str(cert)), dict(root_certificates=cert.read_bytes()),
                   dict(credentials=grpc.ssl_channel_credentials(cert.read_bytes()))):
        with Client(target, token="secret", **kwargs) as client:
            assert client.list_models().names == ["over-tls"], kwargs
    assert all(m.get("authorization") == "Bearer secret" for m in servicer.metadata)


def test_tls_failures_are_unavailable(tls_server):
    target, _, _ = tls_server
    # Plaintext to a TLS port, and TLS with the system roots (which do not trust the test certificate).
    for kwargs in (dict(), dict(tls=True)):
        with Client(target, max_attempts=1, timeout=10, **kwargs) as client:
            with pytest.raises(StyleAlignError) as e:
                client.list_models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, kwargs


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server CA and a client CA (openssl CLI): the server's certificate for localhost /
    127.0.0.1, and a client certificate whose SAN is `py-client.example`."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("server-ca", "client-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.crt"))
    for leaf, ca, san in (("server", "server-ca", "IP:127.0.0.1,DNS:localhost"), ("client", "client-ca", "DNS:py-client.example")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}", "-keyout", str(d / f"{leaf}.key"), "-out", str(d / f"{leaf}.csr"))
        (d / f"{leaf}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", str(d / f"{leaf}.csr"), "-CA", str(d / f"{ca}.crt"), "-CAkey", str(d / f"{ca}.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{leaf}.ext"), "-out", str(d / f"{leaf}.crt"))
    return d


def test_real_server_over_tls(pki):
    from conftest import running_server

    with running_server("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"), "--no-warmup") as addr:
        with Client(addr, root_certificates=pki / "server-ca.crt", client_id="py-tls", timeout=60) as client:
            client.wait_ready(timeout=120)
            assert "tiny" in client.list_models().names
            session = client.patch_model("tiny")
            assert session.session_id
        # Plaintext to the TLS port fails as UNAVAILABLE.
        with Client(addr, max_attempts=1, timeout=10) as client:
            with pytest.raises(StyleAlignError) as e:
                client.list_models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_real_server_over_mtls(pki):
    from conftest import running_server

    args = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "client-ca.crt"), "--no-warmup")
    with running_server(*args) as addr:
        roots = (pki / "server-ca.crt").read_bytes()
        mutual = grpc.ssl_channel_credentials(roots, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes())
        with Client(addr, credentials=mutual, timeout=60) as client:
            client.wait_ready(timeout=120)
            session = client.patch_model("tiny")
            assert client.get_session(session.session_id).session_id == session.session_id
        # Without a client certificate the handshake is refused.
        with Client(addr, root_certificates=roots, max_attempts=1, timeout=10) as client:
            with pytest.raises(StyleAlignError) as e:
                client.list_models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
