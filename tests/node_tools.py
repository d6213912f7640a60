"""The Node.js toolchain of client/node (the client, its generated types, buf), installed with
`npm ci` from the committed package-lock.json once per checkout; tests skip where it cannot be."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"
MODULES = NODE_CLIENT / "node_modules"


def _installed() -> bool:
    """npm ci writes node_modules/.package-lock.json; an older one means the lock file changed."""
    marker = MODULES / ".package-lock.json"
    lock = NODE_CLIENT / "package-lock.json"
    generated = NODE_CLIENT / "generated"
    return marker.is_file() and generated.is_dir() and marker.stat().st_mtime >= lock.stat().st_mtime


def node_client() -> Path:
    """client/node with its dependencies installed (`npm ci`, which also generates the types)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    if not _installed():
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            reachable = subprocess.run(["npm", "ping"], capture_output=True, timeout=60).returncode == 0
            if not reachable:
                pytest.skip("npm ci cannot reach the npm registry")
            pytest.fail(f"npm ci failed in {NODE_CLIENT}: {result.stderr.strip()[-2000:]}")
    return NODE_CLIENT


def run_node(script: str, *args: str) -> str:
    """What a Node.js script prints, run in client/node (so that `require(".")` is the client)
    with `args` as process.argv.slice(1); fails the test with its stderr if it fails."""
    result = subprocess.run(
        ["node", "-e", script, *args], cwd=node_client(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def bin_path(name: str) -> Path:
    """An executable of client/node's dependencies, e.g. buf or tsc."""
    return node_client() / "node_modules" / ".bin" / name
