"""What users pip-install: the package layout, the serving dependencies and the command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    # Run from / so that only the installed package, not the checkout, can be imported.
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False)


def test_server_never_imports_torch_or_transformers():
    result = run_python(
        "import sys, onnxserve.server.app, onnxserve.client;"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_subpackages_live_under_onnxserve():
    result = run_python(
        "import onnxserve.server, onnxserve.client, onnxserve.export, onnxserve.v1.inference_pb2 as p;"
        "print(onnxserve.server.__file__, onnxserve.client.__file__, onnxserve.export.__file__)"
    )
    assert result.returncode == 0, result.stderr
    assert str(ROOT / "server") in result.stdout and str(ROOT / "client") in result.stdout
    assert run_python("import server").returncode != 0, "a bare top-level `server` must not be importable"


def test_every_package_folder_is_built():
    """A folder of Python modules that setup.py does not list is left out of wheels (and so of the
    container image), though an editable install still finds it."""
    listed = set(re.findall(r'"onnxserve[\w.]*": "([^"]+)"', (ROOT / "setup.py").read_text()))
    for top in ("src/onnxserve", "server", "client", "export"):
        for init in (ROOT / top).rglob("__init__.py"):
            folder = str(init.parent.relative_to(ROOT))
            assert folder in listed or "node_modules" in folder, f"{folder} is missing from setup.py's PACKAGES"


# Generated package -> its folder under protos/, as setup.py's STUB_PACKAGES maps them.
STUB_PACKAGES = {"onnxserve/v1": "onnxserve/v1", "onnxserve/kserve_v2": "kserve"}


@pytest.mark.parametrize("package", STUB_PACKAGES)
def test_generated_stubs_match_the_protos(tmp_path, package):
    """The stubs are generated at build time; regenerating now must give the same code."""
    from grpc_tools import protoc

    import onnxserve

    folder = ROOT / "protos" / STUB_PACKAGES[package]
    include = Path(protoc.__file__).parent / "_proto"
    sources = sorted(f"{package}/{p.name}" for p in folder.glob("*.proto"))
    assert sources, f"no .proto files in {folder}"
    assert protoc.main(["protoc", f"-I{package}={folder}", f"-I{include}", f"--python_out={tmp_path}", *sources]) == 0
    installed = Path(onnxserve.__file__).parent.parent / package
    for fresh in (tmp_path / package).glob("*_pb2.py"):
        assert fresh.read_text() == (installed / fresh.name).read_text(), f"{fresh.name} is stale: run make protos"


def test_command_lists_every_subcommand():
    result = subprocess.run(
        [Path(sys.executable).parent / "onnxserve", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("export", "serve", "encode", "classify", "tokenize", "detokenize", "tag", "answer",
                    "fill-mask", "generate", "models", "model"):
        assert command in result.stdout
