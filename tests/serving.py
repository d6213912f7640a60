"""Helpers for the reliability tests: repositories that change under a running server, a server
in its own process, metrics scraping, and load that counts its outcomes by status code."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from onnxserve.repository import version_dirs
from tests.conftest import Exported


def add_version(exported: Exported, repository: Path, name: str, version: int) -> Path:
    """Copies an exported model's latest version in as `name`/`version` the way an export lands:
    into a hidden folder, then renamed, so that the server never sees half a version."""
    source = max(version_dirs(exported.model_dir).items())[1]
    staging = repository / name / f".{version}.partial"
    shutil.copytree(source, staging)
    return staging.rename(repository / name / str(version))


def wait_for(condition: Callable[[], object], timeout_s: float = 30, what: str = "the condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


class Outcomes:
    """Status codes counted over many calls, from any thread."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.details: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, code: grpc.StatusCode, details: str = "") -> None:
        with self._lock:
            self.counts[code.name] += 1
            self.details.setdefault(code.name, details)

    async def call(self, work: Awaitable) -> None:
        try:
            await work
        except grpc.aio.AioRpcError as error:
            self.add(error.code(), error.details() or "")
        else:
            self.add(grpc.StatusCode.OK)

    def unexpected(self, *allowed: str) -> dict[str, str]:
        """The codes seen outside `allowed`, each with the first message that came with it."""
        return {code: self.details[code] for code in self.counts if code not in allowed}


class ServerProcess:
    """`onnxserve serve` in its own process, on free ports; its log goes to a file."""

    def __init__(self, *args: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "onnxserve", "serve", "--port", "0", "--metrics-port", "0", *args]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, env={**os.environ, **(env or {})}
            )
        self.first_line = line = self._first_line(timeout_s=180)
        found = re.search(r"listening on [^:]+:(\d+); metrics on http://[^:]+:(\d+)", line)
        if found is None:
            self.process.kill()
            raise AssertionError(f"the server did not start: {line!r}\n{log_path.read_text()[-3000:]}")
        self.port, self.metrics_port = int(found[1]), int(found[2])
        self.target = f"127.0.0.1:{self.port}"

    def _first_line(self, timeout_s: float) -> str:
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        return lines[0].decode() if lines else ""

    def rss_bytes(self) -> int:
        """Resident memory, from the kernel's accounting of the process."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024

    def terminate(self, timeout_s: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
