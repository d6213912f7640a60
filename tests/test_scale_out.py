"""Scale-out on loopback with real parts: three `onnxserve serve` processes behind nginx as a gRPC
proxy (grpc_pass to an upstream of the three). A client load spreads over all of them, as each
replica's own access log shows; one replica is killed mid-load and every call still succeeds:
nginx passes calls it cannot connect to the dead replica to the next one, and answers the few that
were in flight on it UNAVAILABLE, which the clients' gRPC retry policy sends again (nginx cannot
resend them itself: it streams gRPC request bodies, so it has none left to resend)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnxserve.client import Client

MODEL = "bert-feature-extraction"
ENCODE = "onnxserve.v1.Inference/Encode"
CLIENTS = 4
PHASE_S = 6.0  # load before the kill, then after it
# Encode is idempotent, so a call that failed UNAVAILABLE (the proxy's 502 for a replica that
# died under it) may simply be sent again; gRPC does it within the call's deadline.
RETRY_POLICY = {
    "methodConfig": [{
        "name": [{"service": "onnxserve.v1.Inference"}],
        "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
}
START_TIMEOUT_S = 120.0

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$upstream_addr $status $upstream_status';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream onnxserve {{
{servers}
        keepalive 16;  # reuse HTTP/2 connections to the replicas
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://onnxserve;
            # A call that fails on a dead replica (refused, reset before the response) goes to
            # the next one. gRPC calls are POSTs, which nginx retries only with non_idempotent.
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 2s;
            # A call lost with its replica is answered UNAVAILABLE in gRPC's trailers-only form,
            # which clients may retry; a bare HTTP 502 would count as a response and end the call.
            error_page 502 = /unavailable;
        }}
        location = /unavailable {{
            internal;
            default_type application/grpc;
            add_header grpc-status 14;
            add_header grpc-message "the replica went away";
            return 204;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it where apt can)")
    return found


@dataclass
class Replica:
    port: int
    log: Path
    process: subprocess.Popen

    def encode_calls(self) -> int:
        """Encode calls this replica answered OK, from its JSON access log."""
        count = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                access = entry.get("logger") == "onnxserve.access"
                count += access and entry.get("rpc") == ENCODE and entry["code"] == "OK"
        return count


def start_replica(repository: Path, directory: Path) -> Replica:
    port = free_port()
    log = directory / f"replica-{port}.log"
    command = [
        str(Path(sys.executable).parent / "onnxserve"), "serve", "--repository", str(repository),
        "--port", str(port), "--device", "cpu", "--intra-op-threads", "1",
        # The access log (one line per call) is written at debug level.
        "--log-level", "debug", "--log-format", "json",
    ]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return Replica(port, log, process)


def wait_serving(port: int, process: subprocess.Popen, log: Path, deadline: float) -> None:
    """Polls grpc.health.v1 on the port until SERVING; fails early if the process exits."""
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the process on port {port} exited: {log.read_text()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"port {port} was not SERVING in time: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def replicas(export, tmp_path_factory) -> Iterator[list[Replica]]:
    nginx_binary()  # skip before starting anything
    directory = tmp_path_factory.mktemp("scale-out")
    repository = directory / "repository"
    repository.mkdir()
    (repository / MODEL).symlink_to(export(MODEL, precisions=("fp32",)).model_dir, target_is_directory=True)
    started = [start_replica(repository, directory) for _ in range(3)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for replica in started:
            wait_serving(replica.port, replica.process, replica.log, deadline)
        yield started
    finally:
        for replica in started:
            stop(replica.process)


@pytest.fixture(scope="module")
def proxy(replicas, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{r.port} max_fails=1 fail_timeout=30s;" for r in replicas)
    config = directory / "nginx.conf"
    config.write_text(NGINX_CONF.format(dir=directory, servers=servers, port=port))
    command = [nginx_binary(), "-p", str(directory), "-c", str(config)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    if checked.returncode != 0:
        pytest.skip(f"this nginx cannot proxy gRPC: {checked.stderr.strip()[-500:]}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_serving(port, process, directory / "error.log", time.monotonic() + 30)
        yield f"127.0.0.1:{port}", directory
    finally:
        stop(process)


@dataclass
class Load:
    """Clients calling Encode through the proxy until stopped, each on its own channel."""

    target: str
    successes: int = 0
    failures: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        options = [("grpc.service_config", json.dumps(RETRY_POLICY))]
        with Client(grpc.insecure_channel(self.target, options=options), timeout=30) as client:
            while not self.stopping.is_set():
                try:
                    client.encode(model=MODEL, texts=[f"client {index} says hello"])
                except grpc.RpcError as error:
                    with self.lock:
                        self.failures.append(f"{error.code().name}: {error.details()}")
                else:
                    with self.lock:
                        self.successes += 1

    def count(self) -> int:
        with self.lock:
            return self.successes


def test_load_spreads_over_replicas_and_survives_a_killed_one(replicas, proxy):
    target, nginx_dir = proxy
    load = Load(target)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(PHASE_S)
        victim = replicas[1]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        at_kill = [r.encode_calls() for r in replicas]
        succeeded_at_kill = load.count()
        time.sleep(PHASE_S)
    finally:
        load.stopping.set()
        for thread in threads:
            thread.join(timeout=40)
    after = [r.encode_calls() for r in replicas]

    assert not load.failures, f"{len(load.failures)} calls failed, e.g. {load.failures[:3]}"
    # Every replica took a fair share before the kill (round robin: about a third each).
    total = sum(at_kill)
    assert total >= 30 and all(n >= total * 0.15 for n in at_kill), at_kill
    # After it, the two survivors answered everything, and the clients kept succeeding.
    assert load.count() - succeeded_at_kill >= 30
    assert after[0] > at_kill[0] and after[2] > at_kill[2]
    # The kill did hit calls: nginx logged 502s from the victim ("$upstream_addr $status
    # $upstream_status"), which the clients never saw.
    upstreams = (nginx_dir / "access.log").read_text().splitlines()
    assert any(f"127.0.0.1:{victim.port}" in line and "502" in line for line in upstreams)
