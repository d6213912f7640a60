"""Builds ServerSettings from a TOML file, then ONNXSERVE_* environment variables, then CLI flags,
each overriding the one before. The keys are the fields of ServerSettings and ModelSettings:

    [server]          # ServerSettings' fields
    port = 50051
    [models]          # ModelSettings' fields: the defaults of every model
    max_batch_size = 32
    [models.minilm]   # ModelSettings' fields again, for the model named minilm alone
    precision = "fp32"

A server key KEY is the variable ONNXSERVE_KEY and the flag --key; a model key is
ONNXSERVE_MODELS_KEY and --key (--model-KEY where a server key has the same name)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from onnxserve.server.config.settings import ModelSettings, ServerSettings

from onnxserve.enums import short_names
from onnxserve.repository import RepositoryError, model_dirs, validate_model_name
from onnxserve.v1 import common_pb2

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

ENV_PREFIX = "ONNXSERVE_"
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "log_level": ("debug", "info", "warning", "error"),
    "log_format": ("text", "json"),
    "models.device": ("", "auto", "cpu", "cuda"),
    "models.precision": ("auto", *short_names(common_pb2.Precision)),
}
AT_LEAST_ONE = {
    "models.max_batch_size", "models.max_batch_tokens", "models.max_queue_size", "models.max_inputs_per_request",
    "max_receive_message_bytes", "max_send_message_bytes",
}
FLAG_ALIASES = {"models.intra_op_threads": ("--threads",)}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", Path: "a path"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its key."""


def _fields(cls: type) -> dict[str, Any]:
    """A dataclass's settable fields and their types (the nested model settings excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in ("models", "model_overrides")}


SERVER_FIELDS = _fields(ServerSettings)
MODEL_FIELDS = _fields(ModelSettings)


def _unoptional(kind: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other type -> (it, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(k for k in typing.get_args(kind) if k is not type(None)), True
    return kind, False


def _coerce(key: str, kind: Any, value: Any, from_text: bool) -> Any:
    """Checks (and, for environment text, parses) a value against its field's type."""
    kind, optional = _unoptional(kind)
    if optional and from_text and value == "":
        return None
    if kind is Path and value == "":  # Path("") would be the working directory
        raise ConfigError(f"{key}: must not be empty; leave it out for its default")
    try:
        return _coerce_to(kind, value, from_text)
    except (TypeError, ValueError):
        shown = "a list of strings" if typing.get_origin(kind) is tuple else _KIND_NAMES[kind]
        raise ConfigError(f"{key}: expected {shown}, got {value!r}") from None


def _coerce_to(kind: Any, value: Any, from_text: bool) -> Any:
    if typing.get_origin(kind) is tuple:
        items = _split_list(value) if from_text else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise TypeError
        return tuple(items)
    if kind is bool:
        if from_text and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise TypeError
        return value
    if from_text:
        return kind(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError
    return value


def _split_list(text: str) -> list[str]:
    """A comma-separated list, as variables and flags give one: "a, b" -> ["a", "b"]."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _check(key: str, rule_key: str, value: Any) -> None:
    """Range and choice rules; `rule_key` is the key without a model's name."""
    choices = CHOICES.get(rule_key)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    # An empty host would fail only after the models have loaded, when the port is bound.
    if value == "" and "" not in (choices or ()):
        raise ConfigError(f"{key}: must not be empty; leave it out for its default")
    if rule_key == "required_models":
        for name in value:
            try:
                validate_model_name(name)
            except RepositoryError as error:
                raise ConfigError(f"{key}: {error}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        least = 1 if rule_key in AT_LEAST_ONE else 0
        if value < least:
            raise ConfigError(f"{key}: must be at least {least}, got {value}")
    if rule_key in ("port", "metrics_port") and value is not None and value > 65535:
        raise ConfigError(f"{key}: {value} is not a port number")


def _section(values: Mapping[str, Any], fields: Mapping[str, Any], prefix: str, rule_prefix: str) -> dict:
    """Checks one table of the file against a dataclass's fields."""
    checked = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; the keys are {', '.join(fields)}")
        checked[name] = _coerce(key, fields[name], value, from_text=False)
        _check(key, rule_prefix + name, checked[name])
    return checked


class _Layers:
    """The values gathered so far, later layers overwriting earlier ones."""

    def __init__(self) -> None:
        self.server: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.per_model: dict[str, dict[str, Any]] = {}

    def read_file(self, path: Path) -> None:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config file {path}: {error}") from error
        for table in document:
            if table not in ("server", "models"):
                raise ConfigError(f"{table}: unknown key at the top level; the tables are [server] and [models]")
        self.server.update(_section(_table(document, "server"), SERVER_FIELDS, "server.", ""))
        models = _table(document, "models")
        fields = {k: v for k, v in models.items() if not isinstance(v, dict)}
        self.models.update(_section(fields, MODEL_FIELDS, "models.", "models."))
        for name, table in models.items():
            if isinstance(table, dict):
                self.per_model[_model_name(name)] = _section(table, MODEL_FIELDS, f"models.{name}.", "models.")

    def read_environment(self, environ: Mapping[str, str]) -> None:
        for target, fields, infix, rule_prefix in (
            (self.server, SERVER_FIELDS, "", ""),
            (self.models, MODEL_FIELDS, "MODELS_", "models."),
        ):
            for name, kind in fields.items():
                variable = f"{ENV_PREFIX}{infix}{name.upper()}"
                if variable in environ:
                    target[name] = _coerce(variable, kind, environ[variable], from_text=True)
                    _check(variable, rule_prefix + name, target[name])

    def read_flags(self, flags: Mapping[str, Any]) -> None:
        for key, value in flags.items():
            scope, fields, name = (
                (self.models, MODEL_FIELDS, key[7:]) if key.startswith("models.") else (self.server, SERVER_FIELDS, key)
            )
            flag = _flag_name(key)
            scope[name] = _coerce(flag, fields[name], value, from_text=False)
            _check(flag, key, scope[name])

    def settings(self) -> ServerSettings:
        if "repository" not in self.server:
            raise ConfigError("server.repository: required (in the config file, ONNXSERVE_REPOSITORY or --repository)")
        defaults = ModelSettings(**self.models)
        overrides = {name: dataclasses.replace(defaults, **values) for name, values in self.per_model.items()}
        settings = ServerSettings(**self.server, models=defaults, model_overrides=overrides)
        _check_files(settings)
        return settings


def _table(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: expected a table")
    return table


def _model_name(name: str) -> str:
    try:
        return validate_model_name(name)
    except RepositoryError as error:
        raise ConfigError(f"models.{name}: {error}") from None


def _check_files(settings: ServerSettings) -> None:
    """Cross-key rules, and files that must exist, caught at start rather than at first use."""
    if not settings.repository.is_dir():
        raise ConfigError(f"server.repository: {settings.repository} is not a directory")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("server.tls_cert and server.tls_key: give both, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("server.tls_client_ca: client certificates need TLS; set server.tls_cert and tls_key")
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(settings, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"server.{key}: {path} is not a file")


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServerSettings:
    """The settings from the file, the environment and the flags (keys like "port" or
    "models.max_batch_size"), in increasing precedence. Raises ConfigError naming the key."""
    layers = _Layers()
    if config_file is not None:
        layers.read_file(config_file)
    layers.read_environment(environ or {})
    layers.read_flags(flags or {})
    return layers.settings()


def config_warnings(
    settings: ServerSettings, environ: Mapping[str, str], read_elsewhere: Collection[str] = ()
) -> list[str]:
    """What the configuration names that nothing will use: ONNXSERVE_* variables that are no
    setting (`read_elsewhere`: those the command reads itself), where a misspelling would otherwise
    pass in silence; and model tables or required models with no folder in the repository (not
    refused: hot reload may yet bring one)."""
    known = {
        *(f"{ENV_PREFIX}{name.upper()}" for name in SERVER_FIELDS),
        *(f"{ENV_PREFIX}MODELS_{name.upper()}" for name in MODEL_FIELDS),
        *read_elsewhere,
    }
    found = []
    for variable in sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known):
        close = difflib.get_close_matches(variable, known, n=1)
        found.append(f"{variable}: not a setting; ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    held = set(model_dirs(settings.repository))
    for name in sorted(settings.model_overrides.keys() - held):
        found.append(f"models.{name}: no model folder {name!r} in {settings.repository}; the table waits for one")
    for name in sorted(set(settings.required_models) - held):
        found.append(
            f"required_models: no model folder {name!r} in {settings.repository}; not ready until one loads"
        )
    return found


# --- CLI flags ----------------------------------------------------------------------------------


def _flag_name(key: str) -> str:
    if key.startswith("models."):
        name = key[7:]
        return "--" + ("model-" if name in SERVER_FIELDS else "") + name.replace("_", "-")
    return "--" + key.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; each defaults to None, so that only the flags given override."""
    for prefix, fields in (("", SERVER_FIELDS), ("models.", MODEL_FIELDS)):
        for name, kind in fields.items():
            key = prefix + name
            options: dict[str, Any] = {"dest": key, "default": None, "help": f"sets {_toml_key(key)}"}
            base, _ = _unoptional(kind)
            if base is bool:
                options["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base) is tuple:  # repeated or comma-separated, as in the variable
                options.update(action="extend", type=_split_list, metavar=name.upper().removesuffix("S"))
            else:
                # "" (inherit the server's value) is what leaving the flag out means.
                choices = [c for c in CHOICES.get(key, ()) if c] or None
                options.update(type=base, choices=choices, metavar=None if choices else name.upper())
            parser.add_argument(_flag_name(key), *FLAG_ALIASES.get(key, ()), **options)


def _toml_key(key: str) -> str:
    return key if key.startswith("models.") else f"server.{key}"


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings flags that were given on the command line."""
    keys = [*SERVER_FIELDS, *(f"models.{name}" for name in MODEL_FIELDS)]
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
