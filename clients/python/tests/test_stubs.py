"""The committed stubs: importable from the installed package, and check_stubs.sh catches stale ones."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stylealign_client
from stylealign_client._pb.stylealign.v1 import stylealign_pb2 as pb

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_DIR.parents[1]


def test_stubs_load_from_the_package_and_match_the_proto():
    assert Path(pb.__file__).resolve().is_relative_to(Path(stylealign_client.__file__).resolve().parent)
    assert pb.DESCRIPTOR.name == "stylealign/v1/stylealign.proto"
    assert "hash" in pb.ModelInfo.DESCRIPTOR.fields_by_name
    proto = (REPO_ROOT / "proto" / "stylealign" / "v1" / "stylealign.proto").read_text()
    for message in pb.DESCRIPTOR.message_types_by_name:
        assert f"message {message} " in proto


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="needs grpcio-tools (pip install './clients/python[dev]')")
def test_check_stubs_fails_on_a_changed_proto(tmp_path):
    # A copy of the layout the scripts expect: <root>/proto and <root>/clients/python.
    copy = tmp_path / "clients" / "python"
    copy.mkdir(parents=True)
    for name in ("generate_stubs.sh", "check_stubs.sh", "pyproject.toml"):
        shutil.copy(PACKAGE_DIR / name, copy / name)
    shutil.copytree(PACKAGE_DIR / "src" / "stylealign_client" / "_pb", copy / "src" / "stylealign_client" / "_pb", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    env = {**os.environ, "PYTHON": sys.executable}

    ok = subprocess.run(["bash", str(copy / "check_stubs.sh")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "stubs up to date" in ok.stdout

    proto = tmp_path / "proto" / "stylealign" / "v1" / "stylealign.proto"
    proto.write_text(proto.read_text().replace("  string hash = 7;\n", "  string hash = 7;\n  string license = 99;\n"))
    stale = subprocess.run(["bash", str(copy / "check_stubs.sh")], env=env, capture_output=True, text=True)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert "stale" in stale.stderr and "license" in stale.stdout

    regen = subprocess.run(["bash", str(copy / "generate_stubs.sh")], env=env, capture_output=True, text=True)
    assert regen.returncode == 0, regen.stderr
    assert subprocess.run(["bash", str(copy / "check_stubs.sh")], env=env, capture_output=True).returncode == 0
    assert "license" in (copy / "src" / "stylealign_client" / "_pb" / "stylealign" / "v1" / "stylealign_pb2.pyi").read_text()
