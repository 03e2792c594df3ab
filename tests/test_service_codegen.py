"""The committed generated gRPC code must match the .proto contract."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is needed to regenerate the code")

from dannucnet.service import codegen

REPO = Path(__file__).resolve().parents[1]


def test_committed_code_is_current():
    result = subprocess.run(
        [sys.executable, "-m", "dannucnet.service.codegen", "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_detects_a_stale_contract(tmp_path):
    proto_root = tmp_path / "proto"
    shutil.copytree(codegen.PROTO_ROOT, proto_root)
    out = tmp_path / "generated"
    shutil.copytree(codegen.OUTPUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    assert codegen.check(out, proto_root) == []
    proto = proto_root / "dannucnet" / "v1" / "segmentation.proto"
    proto.write_text(proto.read_text().replace("  bool trained = 10;", "  bool trained = 10;\n  string extra = 99;"))
    problems = codegen.check(out, proto_root)
    assert any(p.startswith("stale: v1/segmentation_pb2.py") for p in problems)
    codegen.write(out, proto_root)
    assert codegen.check(out, proto_root) == []


def test_generated_modules_import_inside_the_package():
    from dannucnet.service._generated.v1 import segmentation_pb2, segmentation_pb2_grpc

    text = (codegen.OUTPUT_DIR / "v1" / "segmentation_pb2_grpc.py").read_text()
    assert "from dannucnet.service._generated.v1 import segmentation_pb2" in text
    assert segmentation_pb2.DESCRIPTOR.package == "dannucnet.v1"
    assert hasattr(segmentation_pb2_grpc, "SegmentationStub")
