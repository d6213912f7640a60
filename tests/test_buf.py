"""The contract's guards: `buf lint` passes on protos/ with buf.yaml's documented exceptions, and
`buf breaking` accepts the working tree against the last commit and refuses a renumbered field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.node_tools import bin_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def buf() -> str:
    """buf from PATH, else the one client/node pins (npm's @bufbuild/buf)."""
    return shutil.which("buf") or str(bin_path("buf"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_buf_lint(buf):
    result = run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_against_the_last_commit(buf):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = run(buf, "breaking", "--against", ".git#ref=HEAD,subdir=protos")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_refuses_a_renumbered_field(buf, tmp_path):
    changed = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", changed)
    inference = changed / "onnxserve" / "v1" / "inference.proto"
    text = inference.read_text()
    assert "  repeated string texts = 3;" in text
    inference.write_text(text.replace("  repeated string texts = 3;", "  repeated string texts = 30;", 1))
    result = run(buf, "breaking", str(changed), "--against", str(ROOT / "protos"))
    assert result.returncode != 0
    assert 'Previously present field "3" with name "texts"' in result.stdout, result.stdout + result.stderr
