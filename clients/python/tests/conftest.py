"""Fixtures: the real `stylealign serve --model tiny` process, and clients of it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from stylealign_client import Client

REPO_ROOT = Path(__file__).resolve().parents[3]
GRPC_LINE = re.compile(r"gRPC on (\S+?)(?:,|$)")


def server_binary() -> Path:
    path = Path(os.environ.get("STYLEALIGN_BIN") or REPO_ROOT / "target" / "release" / "stylealign")
    if not path.is_file():
        pytest.fail(f"no server binary at {path}: build it (cargo build --release --bin stylealign) or set STYLEALIGN_BIN", pytrace=False)
    return path


@contextlib.contextmanager
def running_server(*extra_args: str, startup_timeout: float = 120.0):
    """Starts `stylealign serve --model tiny` on a free loopback port; yields its address once it
    printed the "gRPC on ADDR" line; stops it with SIGTERM and checks it exits 0."""
    args = [str(server_binary()), "serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", *extra_args]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    stderr: list[str] = []

    def pump(stream, sink):
        for line in stream:
            sink(line)
        if sink is lines.put:
            lines.put(None)

    threading.Thread(target=pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, stderr.append), daemon=True).start()
    try:
        addr = None
        while addr is None:
            try:
                line = lines.get(timeout=startup_timeout)
            except queue.Empty:
                raise AssertionError(f"server printed no 'gRPC on' line within {startup_timeout:g}s; stderr:\n{''.join(stderr)}")
            if line is None:
                raise AssertionError(f"server exited with {proc.wait()} before listening; stderr:\n{''.join(stderr)}")
            m = GRPC_LINE.search(line)
            if m:
                addr = m.group(1)
        yield addr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("server did not exit within 90s of SIGTERM")
            assert code == 0, f"server exited with {code} after SIGTERM; stderr:\n{''.join(stderr[-50:])}"


@pytest.fixture(scope="session")
def server():
    with running_server() as addr:
        with Client(addr) as c:
            c.wait_ready(timeout=120)
        yield addr


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("alice=alice-secret-token\nbob=bob-secret-token\n")
    with running_server("--auth-tokens-file", str(tokens)) as addr:
        with Client(addr, token="alice-secret-token") as c:
            c.wait_ready(timeout=120)
        yield addr


@pytest.fixture
def client(server):
    """A client with a client id of its own (its sessions are its own)."""
    with Client(server, client_id="pytest-" + uuid.uuid4().hex[:12]) as c:
        yield c
