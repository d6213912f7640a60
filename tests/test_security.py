"""TLS and mTLS with certificates made here, bearer tokens, message size limits, and model names
that try to leave the repository."""

from __future__ import annotations

import json

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnxserve.client import Client

from onnxserve.v1 import models_pb2, models_pb2_grpc

KIND = "bert-sequence-classification"


@pytest.fixture(scope="module")
def exported(export):
    return {KIND: export(KIND, precisions=("fp32",))}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA for the server, a client certificate it signed, and one from a stranger CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    ca.cert_pem.write_to_path(files["ca"])
    server = ca.issue_cert("localhost", "127.0.0.1")
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(files["key"])
    return {"files": files, "ca": ca, "client": ca.issue_cert("client@example.com"),
            "stranger": stranger.issue_cert("client@example.com")}


def credentials(pki, client_cert=None) -> grpc.ChannelCredentials:
    chain = b"".join(b.bytes() for b in client_cert.cert_chain_pems) if client_cert else None
    key = client_cert.private_key_pem.bytes() if client_cert else None
    return grpc.ssl_channel_credentials(pki["ca"].cert_pem.bytes(), private_key=key, certificate_chain=chain)


def tls_settings(pki, mutual: bool) -> dict:
    files = pki["files"]
    return {"tls_cert": files["cert"], "tls_key": files["key"], "tls_client_ca": files["ca"] if mutual else None}


def classify(target: str, **options) -> str:
    with Client(target, timeout=30, **options) as client:
        return client.classify(model=KIND, texts=["over TLS"])[0].labels[0].label


def test_tls_round_trip(exported, start_server, pki):
    server = start_server(exported, settings=tls_settings(pki, mutual=False))
    assert classify(server.target, credentials=credentials(pki))
    # A plaintext client cannot talk to a TLS server.
    with pytest.raises(grpc.RpcError) as error:
        classify(server.target)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_takes_a_client_certificate_the_ca_signed_and_rejects_others(exported, start_server, pki):
    server = start_server(exported, settings=tls_settings(pki, mutual=True))
    assert classify(server.target, credentials=credentials(pki, pki["client"]))
    for rejected in (credentials(pki, pki["stranger"]), credentials(pki)):  # a stranger's certificate; none
        with pytest.raises(grpc.RpcError) as error:
            classify(server.target, credentials=rejected)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def guarded(exported, start_server):
    return start_server(exported, settings={"auth_tokens": ("first-token", "second-token")})


@pytest.mark.parametrize(("token", "words"), [(None, "missing"), ("wrong", "invalid"), ("first", "invalid")])
def test_a_missing_or_wrong_token_is_unauthenticated(guarded, token, words):
    with pytest.raises(grpc.RpcError) as error:
        classify(guarded.target, token=token)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in error.value.details()


def test_any_configured_token_passes_and_health_stays_open(guarded):
    assert classify(guarded.target, token="first-token") and classify(guarded.target, token="second-token")
    with grpc.insecure_channel(guarded.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=KIND)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:  # everything else, the Models service included
            models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest())
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported)


@pytest.mark.parametrize("name", ["../" + KIND, "..", f"{KIND}/../{KIND}", "/etc/passwd", "a\\..\\b", "", ".hidden"])
def test_model_names_cannot_reach_outside_the_repository(server, name):
    with server.client() as client:
        for call in (lambda: client.classify(model=name, texts=["x"]), lambda: client.get_model(model=name)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid model name" in error.value.details()


def test_a_message_over_the_limit_gets_resource_exhausted(exported, start_server):
    server = start_server(exported, settings={"max_receive_message_bytes": 64 * 1024})
    with server.client() as client:
        with pytest.raises(grpc.RpcError) as error:
            client.classify(model=KIND, texts=["x" * 100_000])
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.value.details()
        assert client.classify(model=KIND, texts=["small enough"])


# --- the `onnxserve` command against a secured server ------------------------------------------


@pytest.fixture(scope="module")
def secured(exported, start_server, pki, tmp_path_factory):
    """An mTLS server with tokens, and the files a client needs to reach it."""
    server = start_server(exported, settings={**tls_settings(pki, mutual=True), "auth_tokens": ("cli-token",)})
    folder = tmp_path_factory.mktemp("client-pki")
    (folder / "client.pem").write_bytes(b"".join(blob.bytes() for blob in pki["client"].cert_chain_pems))
    pki["client"].private_key_pem.write_to_path(folder / "client.key")
    files = {"--tls-ca": pki["files"]["ca"], "--tls-cert": folder / "client.pem", "--tls-key": folder / "client.key"}
    return server, {option: str(path) for option, path in files.items()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """`onnxserve ARGV` in this process: its exit status, and what it printed on stdout and stderr."""
    from onnxserve.cli import main

    try:
        main(["classify", "--model", KIND, "--json", *argv, "through the command"])
        status = 0
    except SystemExit as error:
        status = error.code
    printed = capsys.readouterr()
    return status, printed.out + printed.err


def test_the_command_reaches_an_mtls_server_with_a_token(secured, capsys, monkeypatch):
    server, files = secured
    for name in ("ONNXSERVE_TARGET", "ONNXSERVE_TOKEN", *(f"ONNXSERVE_CLIENT_TLS_{k}" for k in ("CA", "CERT", "KEY"))):
        monkeypatch.delenv(name, raising=False)
    options = [item for pair in files.items() for item in pair]
    status, printed = run_cli(capsys, "--target", server.target, *options, "--token", "cli-token")
    assert status == 0 and json.loads(printed)["results"][0]["labels"], printed
    # The same through the variables alone.
    monkeypatch.setenv("ONNXSERVE_TARGET", server.target)
    monkeypatch.setenv("ONNXSERVE_TOKEN", "cli-token")
    for option, variable in (("--tls-ca", "CA"), ("--tls-cert", "CERT"), ("--tls-key", "KEY")):
        monkeypatch.setenv(f"ONNXSERVE_CLIENT_TLS_{variable}", files[option])
    status, printed = run_cli(capsys)
    assert status == 0 and json.loads(printed)["results"][0]["labels"], printed
    # A flag wins over its variable; the refusals name what was wrong.
    status, printed = run_cli(capsys, "--token", "wrong-token")
    assert status == 1 and "UNAUTHENTICATED" in printed and "invalid" in printed
    monkeypatch.delenv("ONNXSERVE_CLIENT_TLS_CERT")
    monkeypatch.delenv("ONNXSERVE_CLIENT_TLS_KEY")
    status, printed = run_cli(capsys, "--tls-cert", files["--tls-cert"])
    assert status == 2 and "--tls-key" in printed
    status, printed = run_cli(capsys, "--timeout", "10")  # no client certificate: the mTLS handshake fails
    assert status == 1 and "UNAVAILABLE" in printed
    status, printed = run_cli(capsys, "--tls-ca", "/no/such/ca.pem")
    assert status == 2 and "/no/such/ca.pem" in printed
