"""deploy/ and the Dockerfile, checked statically (Docker and a cluster are not available here):
every manifest parses, the core ones validate against the Kubernetes schema, and the fields that
matter hold: gRPC health probes, ports named for gRPC, the image, resources, the repository
volume, settings the server knows; the Dockerfile has its stages, a non-root user, a health check
and no torch in the runtime."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from onnxserve.server.app import SERVICE_NAMES
from onnxserve.server.config.loader import load_settings
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30"
IMAGE = "ghcr.io/onnxserve/onnxserve"
# nvidia/cuda's "-cudnn-" images of CUDA 12.x and 13.x carry cuDNN 9.
IMAGE_CUDNN_MAJOR = 9
# The python3 of each Ubuntu release the CUDA images are built on.
UBUNTU_PYTHON3 = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest(relative: str, kind: str) -> dict[str, Any]:
    [found] = [d for d in documents(DEPLOY / relative) if d["kind"] == kind]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    return main


def env(main: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in main.get("env", [])}


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for these fields: maps merge, and lists of named
    entries (containers, env) merge by name; other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in patch):
        merged = [copy.deepcopy(x) for x in base]
        names = [x.get("name") for x in merged]
        for entry in patch:
            if entry["name"] in names:
                index = names.index(entry["name"])
                merged[index] = merge(merged[index], entry)
            else:
                merged.append(entry)
        return merged
    return patch


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return manifest("base/deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def gpu_deployment(deployment) -> dict[str, Any]:
    return merge(deployment, manifest("overlays/gpu/gpu.yaml", "Deployment"))


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    return manifest("kserve/servingruntime.yaml", "ServingRuntime")


# --- manifests -----------------------------------------------------------------------------------


def test_every_manifest_parses_with_kind_and_name():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        for document in documents(path):
            assert document.get("apiVersion") and document.get("kind"), path
            if document["kind"] != "Kustomization":
                assert document["metadata"]["name"], path


def test_kustomizations_reference_every_manifest():
    referenced = set()
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = documents(kustomization)[0]
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            referenced.add(target)
    orphans = [p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in referenced]
    assert not orphans


def test_core_manifests_validate_against_the_kubernetes_schema(gpu_deployment):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [
        d for path in DEPLOY.rglob("*.yaml") if path.parent.name != "gpu"
        for d in documents(path) if not d["apiVersion"].startswith(("kustomize.", "serving.kserve.io"))
    ]
    assert {d["kind"] for d in core} == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for document in [*core, gpu_deployment]:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_probes_are_native_grpc_health_checks(deployment):
    main = container(deployment)
    port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(main[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert main[probe]["grpc"]["port"] == port, probe
    # Readiness asks for a service the server reports in grpc.health.v1.
    assert main["readinessProbe"]["grpc"]["service"] in SERVICE_NAMES
    assert main["startupProbe"]["periodSeconds"] * main["startupProbe"]["failureThreshold"] >= 300


def test_ports_are_named_for_grpc(deployment, runtime):
    assert {p["name"] for p in container(deployment)["ports"]} >= {"grpc"}
    service = manifest("base/service.yaml", "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients see every pod
    [port] = service["spec"]["ports"]
    assert port["name"] == "grpc" and port["appProtocol"] == "kubernetes.io/h2c" and port["targetPort"] == "grpc"
    [runtime_port] = runtime["spec"]["containers"][0]["ports"]
    assert runtime_port["name"] == "h2c"
    assert f"--port={runtime_port['containerPort']}" in runtime["spec"]["containers"][0]["args"]


def test_one_pinned_image(deployment, runtime):
    images = {container(deployment)["image"], runtime["spec"]["containers"][0]["image"]}
    [image] = images
    name, tag = image.rsplit(":", 1)
    assert name == IMAGE and tag not in ("", "latest")
    [pin] = documents(DEPLOY / "base" / "kustomization.yaml")[0]["images"]
    assert (pin["name"], pin["newTag"]) == (IMAGE, tag)


def test_resources_and_the_gpu_option(deployment, gpu_deployment, runtime):
    for main in (container(deployment), runtime["spec"]["containers"][0]):
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(main["resources"][bound]), bound
    assert "nvidia.com/gpu" not in container(deployment)["resources"]["limits"]
    gpu = container(gpu_deployment)
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(gpu)["ONNXSERVE_DEVICE"] == "cuda" and env(container(deployment))["ONNXSERVE_DEVICE"] == "cpu"
    assert len(gpu["env"]) == len(container(deployment)["env"])  # the patch replaced, not added
    hpa = manifest("base/hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onnxserve"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_repository_is_mounted_read_only_from_a_volume(deployment):
    main = container(deployment)
    [mount] = [m for m in main["volumeMounts"] if m["mountPath"] == env(main)["ONNXSERVE_REPOSITORY"]]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == manifest("base/repository-pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]


def test_settings_are_ones_the_server_knows(deployment, gpu_deployment, runtime, tmp_path):
    for main in (container(deployment), container(gpu_deployment)):
        variables = env(main)
        unknown = [v for v in variables if not v.startswith("ONNXSERVE_")]
        assert not unknown
        settings = load_settings(environ={**variables, "ONNXSERVE_REPOSITORY": str(tmp_path)})
        assert settings.port == int(variables["ONNXSERVE_PORT"]) and settings.host == "0.0.0.0"
        assert settings.metrics_port == 9100 and settings.max_connection_age_s == 300
    help_text = subprocess.run(
        [Path(sys.executable).parent / "onnxserve", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for argument in runtime["spec"]["containers"][0]["args"]:
        assert argument.split("=")[0] in help_text, argument


def test_kserve_runtime_serves_the_inference_service(runtime):
    service = manifest("kserve/inferenceservice.yaml", "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"] in [
        {"name": f["name"], "version": f["version"]} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert "--repository=/mnt/models" in runtime["spec"]["containers"][0]["args"]  # the storage initializer's path


# --- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [argument for k, argument in self.instructions if k == keyword]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, argument = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            base, _, name = argument.partition(" AS ")
            stages.append(Stage(name.strip(), base.strip()))
        elif stages:
            stages[-1].instructions.append((keyword.upper(), argument.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in dockerfile_stages()}


@pytest.fixture(scope="module")
def runtime_base(stages) -> str:
    """The runtime stage's base image, its ARG default filled in."""
    arguments = dict(a.split("=", 1) for a in re.findall(r"ARG (\S+=\S+)", (ROOT / "Dockerfile").read_text()))
    return stages["runtime"].base.replace("${CUDA_IMAGE}", arguments["CUDA_IMAGE"])


def test_dockerfile_stages(stages, runtime_base):
    assert list(stages) == ["wheel", "export", "runtime"]  # runtime last: the default target
    export = " ".join(stages["export"].all("RUN"))
    assert "torch" in export and "[export]" in export
    assert runtime_base.startswith("nvidia/cuda:") and "-runtime-" in runtime_base


def test_runtime_image_carries_the_cuda_the_onnxruntime_gpu_wheel_was_built_for(runtime_base):
    """onnxruntime-gpu's CUDA provider links one CUDA major version (1.31: libcudart.so.13,
    libcublasLt.so.13) and one cuDNN major; on an image with another, creating the provider fails
    and every model falls back or fails. The wheel's own build info and requirements are compared
    with the image's tag, and the image's python3 with the wheel's Requires-Python."""
    from onnxruntime.capi import build_and_package_info as build

    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-(ubuntu\d+\.\d+)", runtime_base)
    assert tag, runtime_base
    assert build.package_name == "onnxruntime-gpu"
    wheel_cuda_major = int(build.cuda_version.split(".")[0])
    assert int(tag[1]) == wheel_cuda_major, f"image CUDA {tag[1]}, onnxruntime-gpu built for CUDA {build.cuda_version}"
    # The wheel's `cudnn` extra names the cuDNN build it needs, e.g. nvidia-cudnn-cu13~=9.0.
    [cudnn] = [r for r in metadata.requires("onnxruntime-gpu") if r.startswith("nvidia-cudnn-")]
    requirement = Requirement(cudnn)
    assert requirement.name == f"nvidia-cudnn-cu{wheel_cuda_major}"
    assert requirement.specifier.contains(f"{IMAGE_CUDNN_MAJOR}.0"), (cudnn, IMAGE_CUDNN_MAJOR)
    python = UBUNTU_PYTHON3[tag[2]]
    assert SpecifierSet(metadata.metadata("onnxruntime-gpu")["Requires-Python"]).contains(python), (tag[2], python)


def test_runtime_stage_holds_no_export_stack(stages):
    runtime = " ".join(argument for _, argument in stages["runtime"].instructions).lower()
    for heavy in ("torch", "transformers", "optimum", "[export]"):
        assert heavy not in runtime
    assert "--from=wheel" in " ".join(stages["runtime"].all("COPY"))


def test_images_run_as_a_non_root_user(stages):
    for name in ("export", "runtime"):
        users = stages[name].all("USER")
        assert users and users[-1] not in ("root", "0", "0:0"), name


def test_runtime_checks_grpc_health_and_serves(stages):
    [healthcheck] = stages["runtime"].all("HEALTHCHECK")
    assert "grpc_health.v1" in healthcheck and "HealthStub" in healthcheck and "SERVING" in healthcheck
    assert stages["runtime"].all("ENTRYPOINT") == ['["onnxserve", "serve"]']
    assert "50051" in stages["runtime"].all("EXPOSE")


def test_copied_sources_exist_and_local_builds_stay_out_of_the_context(stages):
    copied = [source for argument in stages["wheel"].all("COPY") for source in shlex.split(argument)[:-1]]
    for source in copied:
        assert list(ROOT.glob(source)), source
    # Every package folder setup.py builds is in the wheel stage's context.
    roots = {source.split("/*")[0] for source in copied}
    for folder in re.findall(r'"onnxserve[\w.]*": "([^"]+)"', (ROOT / "setup.py").read_text()):
        assert any(folder == root or folder.startswith(root + "/") for root in roots), folder
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "**/node_modules", "build", "repository"} <= set(ignored)
