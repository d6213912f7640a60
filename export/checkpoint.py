"""Where an export starts: SOURCE (a local folder, a Hub id, a GGUF file or a CTranslate2
model.bin) made into a local checkpoint folder, and the config, tokenizer and sentence-transformers
settings read from it."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxserve.export.errors import ExportError
from tokenizers import AddedToken
from tokenizers.models import BPE
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from onnxserve.v1 import common_pb2

#: The file name of a CTranslate2 model (faster-whisper), read by export/ctranslate2.py.
CTRANSLATE2_MODEL = "model.bin"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What an export reads from a Hub repository: configs, tokenizer files and weights. Repositories
# often also hold ONNX, TensorFlow or OpenVINO copies that are never needed here.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
_HUB_FALLBACK_WEIGHTS = ["*.bin"]  # only for repositories without safetensors
_POOLING_MODES = {
    "pooling_mode_mean_tokens": common_pb2.POOLING_MEAN,
    "pooling_mode_cls_token": common_pb2.POOLING_CLS,
    "pooling_mode_lasttoken": common_pb2.POOLING_LAST_TOKEN,
}
# sentence-transformers modules the server reproduces: the transformer, its pooling, and
# normalisation (Encode's `normalize` flag).
_SERVED_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder and how the user named it."""

    path: Path
    source: str  # for the manifest: the Hub id, or the absolute local path
    default_name: str
    gguf_file: Path | None = None  # the GGUF file the checkpoint was converted from


@contextmanager
def open_source(source: str) -> Iterator[Checkpoint]:
    """The checkpoint SOURCE names, downloaded or converted into a temporary folder if need be."""
    local = Path(source).expanduser()
    if source.endswith(".gguf"):
        with _from_gguf(source, local) as checkpoint:
            yield checkpoint
    elif local.name == CTRANSLATE2_MODEL:
        with _from_ctranslate2(local) as checkpoint:
            yield checkpoint
    elif local.is_dir():
        if not (local / "config.json").is_file():
            raise ExportError(f"{local} has no config.json: it is not a transformers checkpoint folder")
        folder = local.resolve()
        yield Checkpoint(folder, str(folder), folder.name)
    elif local.exists():
        raise ExportError(
            f"source {source!r} is a file: give a checkpoint folder, a .gguf file, a CTranslate2 model.bin or a Hub id"
        )
    elif not _HUB_ID.fullmatch(source):
        raise ExportError(f"source {source!r} not found: give a checkpoint folder or a Hugging Face Hub id")
    else:
        yield Checkpoint(_download(source), source, source.rsplit("/", 1)[-1])


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
        if not any(folder.rglob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES + _HUB_FALLBACK_WEIGHTS))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError) as error:
        raise ExportError(
            f"source {repo_id!r} not found: it is no local folder, and the Hugging Face Hub did not give it ({error})"
        ) from error
    if not (folder / "config.json").is_file():
        raise ExportError(f"Hub repository {repo_id} has no config.json: it is not a transformers checkpoint")
    return folder


@contextmanager
def _from_gguf(source: str, local: Path) -> Iterator[Checkpoint]:
    """A GGUF file (local, or `owner/repo/file.gguf` on the Hub) loaded by transformers, which
    dequantizes it, and saved as an ordinary checkpoint for the exporter."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF
    except ImportError:
        raise ExportError(
            "exporting a GGUF file needs the `gguf` package (pip install gguf); or convert it first: "
            "AutoModelForCausalLM.from_pretrained(folder, gguf_file=...).save_pretrained(checkpoint), "
            "the same with AutoTokenizer, then export that checkpoint folder"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM

    if local.is_file():
        location, file_name, origin = str(local.parent.resolve()), local.name, str(local.resolve())
    elif local.exists() or source.count("/") < 2:
        raise ExportError(f"GGUF file {source!r} not found: give a local file or OWNER/REPO/FILE.gguf on the Hub")
    else:
        location, file_name = source.rsplit("/", 1)
        origin = source
    with tempfile.TemporaryDirectory(prefix="onnxserve-gguf-") as folder:
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=file_name)
            _merge_by_score(tokenizer, local if local.is_file() else None)
            model = AutoModelForCausalLM.from_pretrained(location, gguf_file=file_name, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ExportError(f"cannot load GGUF file {source!r}: {error}") from error
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)
        del model
        yield Checkpoint(Path(folder), origin, Path(file_name).stem, _gguf_path(location, file_name))


def _gguf_path(location: str, file_name: str) -> Path:
    """The GGUF file on disk: the local one, or the Hub's copy transformers has just downloaded."""
    local = Path(location) / file_name
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(location, file_name))


@contextmanager
def _from_ctranslate2(model_bin: Path) -> Iterator[Checkpoint]:
    """A CTranslate2 Whisper model.bin (faster-whisper's format) converted into a transformers
    checkpoint in a temporary folder (export/ctranslate2.py)."""
    from onnxserve.export.ctranslate2 import convert_whisper

    if not model_bin.is_file():
        raise ExportError(f"CTranslate2 model {model_bin} not found")
    with tempfile.TemporaryDirectory(prefix="onnxserve-ct2-") as folder:
        convert_whisper(model_bin, Path(folder))
        origin = model_bin.resolve()
        yield Checkpoint(Path(folder), str(origin), origin.parent.name)


def _merge_by_score(tokenizer: PreTrainedTokenizerFast, gguf_file: Path | None) -> None:
    """transformers reads a Gemma GGUF's SentencePiece vocabulary as a Unigram model, but Gemma's
    SentencePiece model is BPE: pieces merge pairwise, the highest-scoring result first, as
    SentencePiece and llama.cpp do. As Unigram, "The capital" came out as "The ▁c ap ..." although
    "▁capital" is a piece. The vocabulary is rebuilt as that BPE: each piece's splits into two
    pieces are its merges, ranked by the piece's score. SentencePiece's user-defined pieces (runs
    of spaces and newlines) are matched whole before any merge, so they become added tokens."""
    backend = tokenizer.backend_tokenizer
    model = json.loads(backend.to_str())["model"]
    if model["type"] != "Unigram":
        return
    pieces = [piece for piece, _ in model["vocab"]]
    ids = {piece: index for index, piece in enumerate(pieces)}
    # transformers renames the byte piece <0x09> to "\t", which Gemma also has as a piece of its
    # own: the byte piece gets its name back, so that it keeps its id.
    pieces = [
        f"<0x{ord(piece):02X}>" if len(piece) == 1 and ids[piece] != index else piece
        for index, piece in enumerate(pieces)
    ]
    ids = {piece: index for index, piece in enumerate(pieces)}
    ranked = sorted(range(len(pieces)), key=lambda index: -model["vocab"][index][1])
    merges = [
        (piece[:cut], piece[cut:])
        for piece in (pieces[index] for index in ranked)
        for cut in range(1, len(piece))
        if piece[:cut] in ids and piece[cut:] in ids
    ]
    unk = pieces[model["unk_id"]] if model.get("unk_id") is not None else None
    backend.model = BPE(ids, merges, unk_token=unk, fuse_unk=True, byte_fallback=model.get("byte_fallback", False))
    if gguf_file is not None:
        symbols = [pieces[index] for index in _user_defined_ids(gguf_file)]
        backend.add_tokens([AddedToken(symbol, normalized=True, special=False) for symbol in symbols])


def _user_defined_ids(gguf_file: Path) -> list[int]:
    from gguf import GGUFReader, TokenType

    field = GGUFReader(gguf_file).fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[index][0]) for index in field.data]
    return [index for index, kind in enumerate(types) if kind == TokenType.USER_DEFINED]


def load_config(checkpoint: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read {checkpoint / 'config.json'}: {error}") from error


def load_tokenizer(checkpoint: Path) -> PreTrainedTokenizerFast:
    """The checkpoint's fast tokenizer: the server runs the Rust tokenizer from tokenizer.json."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError) as error:
        raise ExportError(f"missing tokenizer: cannot load one from {checkpoint} ({error})") from error
    if not tokenizer.is_fast:
        raise ExportError(
            f"{checkpoint} has only a slow (Python) tokenizer, {type(tokenizer).__name__}; the server needs "
            "a fast one (tokenizer.json): convert it with AutoTokenizer.from_pretrained(..., use_fast=True)"
            ".save_pretrained(...) where transformers can, or add a tokenizer.json"
        )
    return tokenizer


def sentence_transformers_modules(checkpoint: Path) -> list[dict[str, Any]]:
    """modules.json of a sentence-transformers folder; empty for plain transformers checkpoints."""
    path = checkpoint / "modules.json"
    if not path.is_file():
        return []
    modules = json.loads(path.read_text(encoding="utf-8"))
    unserved = [m["type"] for m in modules if m["type"].rsplit(".", 1)[-1] not in _SERVED_MODULES]
    if unserved:
        raise ExportError(
            f"{checkpoint} is a sentence-transformers model with modules the server cannot run after "
            f"the transformer: {', '.join(unserved)}"
        )
    return modules


def pooling(checkpoint: Path) -> int:
    """The sentence-transformers pooling (1_Pooling/config.json); unspecified without one."""
    for module in sentence_transformers_modules(checkpoint):
        if module["type"].endswith(".Pooling"):
            settings = json.loads((checkpoint / module["path"] / "config.json").read_text(encoding="utf-8"))
            chosen = [key for key, value in settings.items() if key.startswith("pooling_mode_") and value]
            if len(chosen) != 1 or chosen[0] not in _POOLING_MODES:
                raise ExportError(
                    f"unsupported sentence-transformers pooling {', '.join(chosen) or 'none'} in "
                    f"{checkpoint / module['path']}: the server pools by mean, cls or last token"
                )
            return _POOLING_MODES[chosen[0]]
    return common_pb2.POOLING_UNSPECIFIED


def sentence_transformers_max_length(checkpoint: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length: the length the embedding model was trained at."""
    path = checkpoint / "sentence_bert_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
