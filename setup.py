"""Generates the gRPC stubs from protos/ as part of every build (wheel, sdist or editable)."""

from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "protos"
OUTPUT_ROOT = ROOT / "src"
PACKAGES = {
    "onnxserve": "src/onnxserve",
    "onnxserve.v1": "src/onnxserve/v1",
    "onnxserve.kserve_v2": "src/onnxserve/kserve_v2",
    "onnxserve.server": "server",
    "onnxserve.server.api": "server/api",
    "onnxserve.server.api.kserve": "server/api/kserve",
    "onnxserve.server.config": "server/config",
    "onnxserve.server.models": "server/models",
    "onnxserve.server.observability": "server/observability",
    "onnxserve.server.quality": "server/quality",
    "onnxserve.server.runtime": "server/runtime",
    "onnxserve.server.tasks": "server/tasks",
    "onnxserve.server.tasks.generation": "server/tasks/generation",
    "onnxserve.client": "client",
    "onnxserve.export": "export",
}


# Generated package -> its folder under protos/. Each folder is mapped onto its package's path,
# so KServe's proto (package `inference`) imports as onnxserve.kserve_v2, not as a top-level module.
STUB_PACKAGES = {"onnxserve/v1": "onnxserve/v1", "onnxserve/kserve_v2": "kserve"}


def compile_protos() -> None:
    from grpc_tools import protoc  # a build requirement, see pyproject.toml

    include = Path(protoc.__file__).parent / "_proto"
    for package, folder in STUB_PACKAGES.items():
        sources = sorted(f"{package}/{p.name}" for p in (PROTO_ROOT / folder).glob("*.proto"))
        args = [
            "grpc_tools.protoc",
            f"-I{package}={PROTO_ROOT / folder}",
            f"-I{include}",
            f"--python_out={OUTPUT_ROOT}",
            f"--pyi_out={OUTPUT_ROOT}",
            f"--grpc_python_out={OUTPUT_ROOT}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(sources))
        (OUTPUT_ROOT / package / "__init__.py").write_text(
            f'"""Generated from protos/{folder} by `make protos`; never edit by hand."""\n'
        )


class BuildProtos(Command):
    description = "generate the Python gRPC stubs from protos/"
    user_options: ClassVar[list] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        compile_protos()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


class EggInfoWithProtos(egg_info):
    """egg_info runs first in every build (wheel, sdist, editable) and lists the packages' files,
    so on a clean clone the generated packages must exist before it does."""

    def run(self) -> None:
        compile_protos()
        super().run()


setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    cmdclass={"build_protos": BuildProtos, "build_py": BuildPyWithProtos, "egg_info": EggInfoWithProtos},
)
