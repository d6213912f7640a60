"""The config file, ONNXSERVE_* variables and flags: precedence, per-model tables, and errors
that name the key."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from onnxserve.server.config.loader import ConfigError, add_flags, config_warnings, flags_given, load_settings
from onnxserve.server.config.settings import ModelSettings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "onnxserve.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        f"""
[server]
repository = "{tmp_path}"
port = 6000
shutdown_grace_s = 3
auth_tokens = ["one", "two"]
metrics_port = 9100

[models]
max_batch_size = 8
precision = "fp32"

[models.minilm]
max_queue_size = 16
warmup = false
""",
    )


def parse_flags(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return flags_given(parser.parse_args(argv))


def test_file_sets_server_and_model_settings(config, tmp_path):
    settings = load_settings(config)
    assert settings.repository == tmp_path and settings.port == 6000
    assert settings.shutdown_grace_s == 3.0 and isinstance(settings.shutdown_grace_s, float)
    assert settings.auth_tokens == ("one", "two") and settings.metrics_port == 9100
    assert settings.models == ModelSettings(max_batch_size=8, precision="fp32")
    # A model's table refines the defaults; other models get the defaults.
    minilm = settings.model_settings("minilm")
    assert (minilm.max_batch_size, minilm.precision, minilm.max_queue_size, minilm.warmup) == (8, "fp32", 16, False)
    assert settings.model_settings("other") == settings.models


def test_environment_overrides_the_file_and_flags_override_both(config):
    environ = {"ONNXSERVE_PORT": "7000", "ONNXSERVE_MODELS_MAX_BATCH_SIZE": "4", "ONNXSERVE_AUTH_TOKENS": "a, b",
               "ONNXSERVE_LOG_FORMAT": "json", "ONNXSERVE_TARGET": "ignored:1"}
    settings = load_settings(config, environ)
    assert settings.port == 7000 and settings.models.max_batch_size == 4
    assert settings.auth_tokens == ("a", "b") and settings.log_format == "json"
    settings = load_settings(config, environ, parse_flags("--port", "8000", "--max-batch-size", "2", "--no-warmup"))
    assert settings.port == 8000 and settings.models.max_batch_size == 2 and settings.models.warmup is False
    # The model's own table still wins over the defaults, wherever those came from: a flag sets the
    # defaults of every model, and the table refines them for its model.
    assert settings.model_settings("minilm").max_queue_size == 16
    settings = load_settings(config, {"ONNXSERVE_MODELS_MAX_QUEUE_SIZE": "8"}, parse_flags("--max-queue-size", "4"))
    assert settings.model_settings("minilm").max_queue_size == 16
    assert settings.model_settings("other").max_queue_size == 4


def test_flags_alone_suffice(tmp_path):
    flags = parse_flags("--repository", str(tmp_path), "--threads", "3", "--auth-tokens", "x", "--auth-tokens", "y")
    settings = load_settings(flags=flags)
    assert settings.models.intra_op_threads == 3 and settings.auth_tokens == ("x", "y")
    assert settings.port == 50051  # untouched keys keep the defaults


def test_a_list_flag_splits_commas_like_its_variable(tmp_path):
    flags = parse_flags("--repository", str(tmp_path), "--auth-tokens", "a,b", "--auth-tokens", "c",
                        "--required-models", "m1, m2")
    settings = load_settings(flags=flags)
    assert settings.auth_tokens == ("a", "b", "c") and settings.required_models == ("m1", "m2")
    settings = load_settings(environ={"ONNXSERVE_REPOSITORY": str(tmp_path), "ONNXSERVE_AUTH_TOKENS": "a,b"})
    assert settings.auth_tokens == ("a", "b")


def test_an_empty_value_unsets_only_optional_keys(tmp_path):
    base = {"ONNXSERVE_REPOSITORY": str(tmp_path)}
    for variable in ("ONNXSERVE_HOST", "ONNXSERVE_METRICS_HOST", "ONNXSERVE_REPOSITORY"):
        with pytest.raises(ConfigError, match=f"{variable}: must not be empty"):
            load_settings(environ={**base, variable: ""})
    with pytest.raises(ConfigError, match="--host: must not be empty"):
        load_settings(environ=base, flags=parse_flags("--host", ""))
    with pytest.raises(ConfigError, match=r"server\.host: must not be empty"):
        load_settings(write(tmp_path, '[server]\nhost = ""\n'), base)
    # Optional keys, and a model's device ("" follows the server's), take the empty value.
    settings = load_settings(environ={**base, "ONNXSERVE_METRICS_PORT": "", "ONNXSERVE_MODELS_DEVICE": ""})
    assert settings.metrics_port is None and settings.models.device == ""


def test_required_models_are_model_names(tmp_path):
    with pytest.raises(ConfigError, match=r"ONNXSERVE_REQUIRED_MODELS: invalid model name '\.\./up'"):
        load_settings(environ={"ONNXSERVE_REPOSITORY": str(tmp_path), "ONNXSERVE_REQUIRED_MODELS": "ok,../up"})


def test_unused_settings_are_warned_about(config, tmp_path):
    (tmp_path / "served").mkdir()
    environ = {"ONNXSERVE_PROT": "1", "ONNXSERVE_TOKEN": "the client's", "ONNXSERVE_REQUIRED_MODELS": "served,gone"}
    warnings = config_warnings(load_settings(config, environ), environ, read_elsewhere=("ONNXSERVE_TOKEN",))
    assert warnings == [
        "ONNXSERVE_PROT: not a setting; ignored (did you mean ONNXSERVE_PORT?)",
        f"models.minilm: no model folder 'minilm' in {tmp_path}; the table waits for one",
        f"required_models: no model folder 'gone' in {tmp_path}; not ready until one loads",
    ]


def serve_command(capsys, monkeypatch, *argv: str, **environ: str) -> tuple[object, str]:
    """`onnxserve serve ARGV` in this process, stopped where it would start serving: its exit
    status (None: it got that far) and what it printed."""
    from onnxserve import cli

    async def serve(settings):
        return None

    monkeypatch.setattr("onnxserve.server.app.serve", serve)
    monkeypatch.setattr("onnxserve.server.observability.logs.configure_logging", lambda level, form: None)  # caplog's
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    try:
        cli.main(["serve", *argv])
        status = None
    except SystemExit as error:
        status = error.code
    printed = capsys.readouterr()
    return status, printed.out + printed.err


def test_the_command_refuses_empty_variables_before_loading(tmp_path, capsys, monkeypatch):
    status, printed = serve_command(capsys, monkeypatch, "--repository", str(tmp_path), ONNXSERVE_HOST="")
    assert status == 2 and "ONNXSERVE_HOST: must not be empty" in printed


def test_the_command_prints_brackets_as_they_are(tmp_path, capsys, monkeypatch):
    status, printed = serve_command(capsys, monkeypatch, "--config", str(write(tmp_path, "[serve]\nport = 1\n")))
    assert status == 2 and "the tables are [server] and [models]" in printed


def test_the_command_logs_its_warnings(config, capsys, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="onnxserve.config"):
        status, _ = serve_command(capsys, monkeypatch, "--config", str(config), ONNXSERVE_MODEL_PRECISION="fp32")
    assert status is None
    assert "ONNXSERVE_MODEL_PRECISION: not a setting; ignored (did you mean ONNXSERVE_MODELS_PRECISION?)" in caplog.text
    assert "models.minilm: no model folder 'minilm'" in caplog.text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[server]\nprot = 1", ["server.prot", "unknown key"]),
        ("[server]\nport = 'x'", ["server.port", "integer"]),
        ("[server]\nport = 70000", ["server.port", "port number"]),
        ("[server]\nshutdown_grace_s = -1", ["server.shutdown_grace_s", "at least 0"]),
        ("[server]\nlog_format = 'xml'", ["server.log_format", "'json'"]),
        ("[server]\nauth_tokens = 'secret'", ["server.auth_tokens", "list of strings"]),
        ("[models]\nmax_batch_size = 0", ["models.max_batch_size", "at least 1"]),
        ("[models]\nprecision = 'int2'", ["models.precision", "'int4'"]),
        ("[models.m]\nwarmup = 'yes'", ["models.m.warmup", "bool"]),
        ("[models.'../up']\nwarmup = true", ["models.../up", "invalid model name"]),
        ("[serve]\nport = 1", ["serve", "unknown key"]),
        ("[server\n", ["onnxserve.toml"]),
    ],
)
def test_an_invalid_file_names_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, f"{text}\n"), {"ONNXSERVE_REPOSITORY": str(tmp_path)})
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"ONNXSERVE_PORT": "many"}, ["ONNXSERVE_PORT", "integer"]),
        ({"ONNXSERVE_MODELS_WARMUP": "maybe"}, ["ONNXSERVE_MODELS_WARMUP", "bool"]),
        ({"ONNXSERVE_POLL_INTERVAL_S": "nan"}, ["ONNXSERVE_POLL_INTERVAL_S", "finite"]),
    ],
)
def test_an_invalid_variable_is_named(tmp_path, environ, words):
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"ONNXSERVE_REPOSITORY": str(tmp_path), **environ})
    for word in words:
        assert word in str(error.value)


def test_cross_key_and_file_checks(tmp_path):
    base = {"ONNXSERVE_REPOSITORY": str(tmp_path)}
    cases = [
        ({}, "server.repository: required"),
        ({"ONNXSERVE_REPOSITORY": str(tmp_path / "missing")}, "is not a directory"),
        ({**base, "ONNXSERVE_TLS_CERT": str(tmp_path)}, "give both"),
        ({**base, "ONNXSERVE_TLS_CLIENT_CA": str(tmp_path)}, "server.tls_client_ca"),
        ({**base, "ONNXSERVE_TLS_CERT": str(tmp_path / "c"), "ONNXSERVE_TLS_KEY": str(tmp_path / "k")},
         "server.tls_cert"),
    ]
    for environ, words in cases:
        with pytest.raises(ConfigError, match=words):
            load_settings(environ=environ)


def test_serve_refuses_an_invalid_config_at_start(tmp_path):
    command = [sys.executable, "-m", "onnxserve", "serve", "--config", str(write(tmp_path, "[server]\nport = 'x'\n"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "server.port" in result.stdout + result.stderr
