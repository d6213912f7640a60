"""Faults: a corrupt model, a model folder deleted while serving, a new version dropped in under
load, clients that cancel mid-call, and SIGTERM under load. Each test builds its own repository,
so that it can change it under the server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnxserve.client import AsyncClient, Client

from onnxserve.repository import read_manifest
from tests.serving import Outcomes, ServerProcess, add_version, metric, wait_for

KIND = "bert-sequence-classification"
POLL_S = 0.1
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def model(export):
    return export(KIND, precisions=("fp32",))


@pytest.fixture
def repository(tmp_path):
    path = tmp_path / "repository"
    path.mkdir()
    return path


@pytest.fixture
def serve(start_server, repository):
    """A server over `repository`, polling it often; stopped when the test ends."""
    started = []

    def start(**model_settings):
        settings = {"repository": repository, "poll_interval_s": POLL_S, "metrics_port": 0}
        server = start_server({}, settings=settings, **model_settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_a_corrupt_model_fails_alone_with_its_reason(model, repository, serve, caplog):
    for name in ("good", "corrupt", "no-tokenizer"):
        add_version(model, repository, name, 1)
    graph = repository / "corrupt" / "1" / read_manifest(repository / "corrupt" / "1").variants[0].files[0].path
    graph.write_bytes(b"this is not an ONNX graph")
    (repository / "no-tokenizer" / "1" / "tokenizer.json").unlink()
    with caplog.at_level(logging.ERROR):
        server = serve()
    with server.client() as client:
        states = {m.name: (m.state, m.state_reason) for m in client.list_models()}
        assert states["good"] == ("ready", "")
        assert states["corrupt"][0] == "failed" and graph.name in states["corrupt"][1]
        assert states["no-tokenizer"][0] == "failed" and "tokenizer.json is missing" in states["no-tokenizer"][1]
        assert client.get_model(model="corrupt").state_reason == states["corrupt"][1]
        with pytest.raises(grpc.RpcError) as error:
            client.classify(model="corrupt", texts=["x"])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and graph.name in error.value.details()
        assert client.classify(model="good", texts=["the others go on"])
    assert (health(server.target, "corrupt"), health(server.target, "good"), health(server.target, "")) == (
        NOT_SERVING, SERVING, SERVING
    )
    assert any("corrupt" in r.getMessage() and graph.name in r.getMessage() for r in caplog.records)
    # A good version dropped in later heals it.
    add_version(model, repository, "corrupt", 2)
    wait_for(lambda: health(server.target, "corrupt") == SERVING, what="version 2 of corrupt serving")


def test_a_model_folder_deleted_while_serving_is_unloaded(model, repository, serve):
    add_version(model, repository, "doomed", 1)
    add_version(model, repository, "kept", 1)
    server = serve()
    outcomes = Outcomes()
    stop = threading.Event()

    def load() -> None:
        with server.client() as client:
            while not stop.is_set():
                try:
                    client.classify(model="doomed", texts=["still here?"])
                    outcomes.add(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    outcomes.add(error.code(), error.details())

    caller = threading.Thread(target=load)
    caller.start()
    try:
        wait_for(lambda: outcomes.counts["OK"] > 10, what="calls on the doomed model")
        shutil.rmtree(repository / "doomed")
        wait_for(lambda: outcomes.counts["NOT_FOUND"] > 10, what="the doomed model unloaded")
    finally:
        stop.set()
        caller.join()
    assert not outcomes.unexpected("OK", "NOT_FOUND"), outcomes.details
    assert health(server.target, "doomed") == NOT_SERVING
    with server.client() as client:
        assert [m.name for m in client.list_models()] == ["kept"]
        assert client.classify(model="kept", texts=["unaffected"])


async def _calls_until(stop: threading.Event, target: str, seen: list[tuple[str, int]]) -> None:
    """One caller's sequential calls, each recording its status and the version that answered."""
    async with AsyncClient(target, timeout=30) as client:
        while not stop.is_set():
            try:
                response = await client.classify(model="live", texts=["which version answers?"] * 4)
                seen.append(("OK", response.metadata.version))
            except grpc.aio.AioRpcError as error:
                seen.append((error.code().name, 0))


def test_a_new_version_takes_over_under_load_without_failed_calls(model, repository, serve, caplog):
    add_version(model, repository, "live", 1)
    server = serve()
    stop = threading.Event()
    callers: list[list[tuple[str, int]]] = [[] for _ in range(4)]

    async def load() -> None:
        await asyncio.gather(*(_calls_until(stop, server.target, seen) for seen in callers))

    runner = threading.Thread(target=asyncio.run, args=(load(),))
    with caplog.at_level(logging.INFO):
        runner.start()
        try:
            wait_for(lambda: all(len(seen) > 20 for seen in callers), what="load on version 1")
            add_version(model, repository, "live", 2)
            wait_for(lambda: all(seen[-1][1] == 2 for seen in callers), what="version 2 answering")
            time.sleep(0.5)
        finally:
            stop.set()
            runner.join()
        wait_for(lambda: any("live version 1 unloaded" in r.getMessage() for r in caplog.records), what="unload")
    for seen in callers:
        assert {code for code, _ in seen} == {"OK"}, seen
        versions = [version for _, version in seen]
        # Atomic: once a caller is answered by version 2, version 1 never answers it again.
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
    with server.client() as client:
        assert [(m.version, m.state) for m in client.list_models()] == [(2, "ready")]


def test_clients_cancelling_mid_call_free_their_places(model, repository, serve):
    add_version(model, repository, "busy", 1)
    queue_size = 8
    # Runs that could still grow are held for a second, so every call is cancelled mid-call.
    server = serve(max_queue_size=queue_size, max_batch_size=64, max_queue_delay_ms=1000)
    texts = ["waiting for batchmates"] * 2

    async def cancel_many() -> None:
        async with AsyncClient(server.target, timeout=30) as client:
            for _ in range(5):
                calls = [asyncio.ensure_future(client.classify(model="busy", texts=texts)) for _ in range(queue_size)]
                await asyncio.sleep(0.02)
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(cancel_many())
    loaded = server.server.registry.get("busy")
    wait_for(lambda: loaded.pipeline.queue_depth() == 0 and server.server.registry.in_flight(loaded) == 0,
             what="the cancelled calls leaving the queue")

    async def fill_the_queue() -> Outcomes:
        outcomes = Outcomes()
        async with AsyncClient(server.target, timeout=60) as client:
            calls = [client.classify(model="busy", texts=texts) for _ in range(queue_size)]
            await asyncio.gather(*map(outcomes.call, calls))
        return outcomes

    # Every place the cancelled calls held is free again.
    assert asyncio.run(fill_the_queue()).counts == {"OK": queue_size}
    assert metric(server.server.metrics_port, "onnxserve_requests_total", model="busy", code="CANCELLED") > 0


def test_sigterm_under_load_finishes_the_calls_in_flight(model, repository, tmp_path):
    add_version(model, repository, "m", 1)
    # The model holds a run that could still grow for up to 2 s, so the calls are in flight at
    # SIGTERM however fast the machine: 24 calls of 2 texts fit one run of 64.
    server = ServerProcess(
        "--repository", str(repository), "--device", "cpu", "--shutdown-grace-s", "30", "--drain-delay-s", "1",
        "--max-batch-size", "64", "--max-queue-delay-ms", "2000", log_path=tmp_path / "server.log",
    )
    texts = ["in flight when the server is told to stop"] * 2

    async def load_then_terminate() -> tuple[Outcomes, int, Outcomes, int]:
        outcomes, late = Outcomes(), Outcomes()
        async with AsyncClient(server.target, timeout=60) as client:
            calls = [asyncio.ensure_future(outcomes.call(client.classify(model="m", texts=texts))) for _ in range(24)]
            await asyncio.sleep(0.5)
            assert not outcomes.counts, "the calls finished before SIGTERM"
            terminated = asyncio.get_running_loop().run_in_executor(None, server.terminate)
            # Health turns NOT_SERVING at once, while the server still answers (the drain delay).
            await asyncio.sleep(0.3)
            health_state = health(server.target, "m")
            await asyncio.gather(*calls)
            await asyncio.sleep(1)
            await late.call(client.classify(model="m", texts=["too late"]))
            return outcomes, health_state, late, await terminated

    try:
        outcomes, health_state, late, exit_code = asyncio.run(load_then_terminate())
    finally:
        server.close()
    assert outcomes.counts == {"OK": 24}, outcomes.details
    assert health_state == NOT_SERVING
    assert late.counts == {"UNAVAILABLE": 1}
    assert exit_code == 0, server.log_path.read_text()[-3000:]


def test_calls_over_the_concurrency_limit_are_refused_at_once(model, repository, start_server):
    add_version(model, repository, "m", 1)
    settings = {"repository": repository, "max_concurrent_calls": 2, "metrics_port": 0}
    # The first two calls are held for a second (a run waiting for batchmates) while the rest arrive.
    server = start_server({}, settings=settings, max_batch_size=64, max_queue_delay_ms=1000)
    texts = ["holding a place"] * 2

    async def burst() -> Outcomes:
        outcomes = Outcomes()
        async with AsyncClient(server.target, timeout=60) as client:
            await asyncio.gather(*(outcomes.call(client.classify(model="m", texts=texts)) for _ in range(8)))
        return outcomes

    try:
        outcomes = asyncio.run(burst())
        assert outcomes.counts["OK"] >= 2 and outcomes.counts["RESOURCE_EXHAUSTED"] >= 1, outcomes.counts
        assert "max_concurrent_calls" in outcomes.details["RESOURCE_EXHAUSTED"]
        port = server.server.metrics_port
        assert metric(port, "onnxserve_requests_total", model="m", code="RESOURCE_EXHAUSTED") >= 1
        assert health(server.target, "m") == SERVING  # health is never refused
    finally:
        server.stop()


def test_aged_connections_are_replaced_without_failed_calls(model, repository, start_server):
    """max_connection_age (gRPC A9): the server closes connections past the age; clients
    reconnect, which behind a load balancer spreads them over new replicas."""
    add_version(model, repository, "m", 1)
    settings = {"repository": repository, "max_connection_age_s": 0.3, "max_connection_age_grace_s": 5}
    server = start_server({}, settings=settings)
    states: list[grpc.ChannelConnectivity] = []
    try:
        with grpc.insecure_channel(server.target) as channel, Client(channel, timeout=30) as client:
            channel.subscribe(states.append, try_to_connect=True)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                assert client.classify(model="m", texts=["across connections"])
                time.sleep(0.05)
    finally:
        server.stop()
    assert states.count(grpc.ChannelConnectivity.READY) >= 2, states
