"""The `onnxserve` command: export, serve, and one subcommand per RPC."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxserve.client.client import DEFAULT_TARGET
from onnxserve.enums import short_names
from onnxserve.server.config.loader import ConfigError, add_flags, config_warnings, flags_given, load_settings
from onnxserve.v1 import common_pb2

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # a message is one line, however long


def _fail(what: str, detail: object, status: int) -> NoReturn:
    """Prints the failure on stderr and exits; `detail` is escaped, so that its own brackets
    (`[server]`, `[MASK]`) are printed instead of read as rich markup."""
    errors.print(f"[red]{escape(what)}:[/red] {escape(str(detail))}")
    raise SystemExit(status)


# --- export and serve ---------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> None:
    from onnxserve.export.exporter import ExportError, export_model  # torch only for this command

    try:
        path = export_model(
            args.source, Path(args.repository), name=args.name, task=args.task,
            precisions=args.precision, force=args.force,
        )
    except ExportError as error:
        _fail("export failed", error, 1)
    console.print(f"exported to [bold]{escape(str(path))}[/bold]")


def _serve(args: argparse.Namespace) -> None:
    from onnxserve.server.app import serve
    from onnxserve.server.errors import ModelLoadError
    from onnxserve.server.observability.logs import configure_logging

    config = args.config or os.environ.get("ONNXSERVE_CONFIG")
    try:
        settings = load_settings(Path(config) if config else None, os.environ, flags_given(args))
    except ConfigError as error:
        _fail("invalid configuration", error, 2)
    configure_logging(settings.log_level, settings.log_format)
    for warning in config_warnings(settings, os.environ, ("ONNXSERVE_CONFIG", *CLIENT_VARIABLES.values())):
        logging.getLogger("onnxserve.config").warning(warning)
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as error:
        _fail("cannot serve", error, 1)


# --- RPC subcommands ----------------------------------------------------------------------------


def _print(args: argparse.Namespace, value: Any, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """JSON with --json (the results as plain objects), else a table."""
    if args.json:
        print(json.dumps(_plain(value), ensure_ascii=False, indent=2))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(escape(f"{cell:.4f}" if isinstance(cell, float) else str(cell)) for cell in row))
    console.print(table)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _encode(client: Any, args: argparse.Namespace) -> None:
    response = client.encode(model=args.model, texts=args.texts, pooling=args.pooling, normalize=args.normalize)
    rows = [
        (t, len(v), ", ".join(f"{x:.4f}" for x in v[:4]) + ", ...")
        for t, v in zip(args.texts, response, strict=True)
    ]
    _print(args, response, ("text", "dim", "embedding"), rows)


def _classify(client: Any, args: argparse.Namespace) -> None:
    response = client.classify(
        model=args.model, texts=args.texts, text_pairs=args.pair, top_k=args.top_k,
        candidate_labels=args.candidate_labels, hypothesis_template=args.hypothesis_template or "",
        multi_label=args.multi_label,
    )
    rows = [(t, x.label, x.score) for t, r in zip(args.texts, response, strict=True) for x in r.labels]
    _print(args, response, ("text", "label", "score"), rows)


def _classify_image(client: Any, args: argparse.Namespace) -> None:
    images = [_read(path, "image") for path in args.images]
    response = client.classify_image(model=args.model, images=images, top_k=args.top_k)
    _print_labels(args, response, "image", args.images)


def _print_labels(args: argparse.Namespace, response: Any, column: str, paths: Sequence[str]) -> None:
    """Each file's labels and scores, a row each."""
    rows = [(path, x.label, x.score) for path, r in zip(paths, response, strict=True) for x in r.labels]
    _print(args, response, (column, "label", "score"), rows)


def _encode_image(client: Any, args: argparse.Namespace) -> None:
    images = [_read(path, "image") for path in args.images]
    response = client.encode_image(model=args.model, images=images, pooling=args.pooling, normalize=args.normalize)
    rows = [
        (path, len(v), ", ".join(f"{x:.4f}" for x in v[:4]) + ", ...")
        for path, v in zip(args.images, response, strict=True)
    ]
    _print(args, response, ("image", "dim", "embedding"), rows)


def _reconstruct(client: Any, args: argparse.Namespace) -> None:
    """Reconstructs masked image files; --output writes each reconstruction as a PNG."""
    images = [_read(path, "image") for path in args.images]
    masks = [_read(args.mask, "--mask")] if args.mask else [args.patches] if args.patches else []
    response = client.reconstruct_image(
        model=args.model, images=images, masks=masks, seed=args.seed, mask_ratio=args.mask_ratio
    )
    written = [_write_reconstruction(args.output, path, r.image) for path, r in zip(args.images, response, strict=True)]
    results = [
        {"image": path, "loss": r.loss, "masked_patches": r.masked_patches, "written": target}
        for path, r, target in zip(args.images, response, written, strict=True)
    ]
    rows = [(x["image"], x["loss"], len(x["masked_patches"]), x["written"] or "") for x in results]
    _print(args, results, ("image", "loss", "masked patches", "written"), rows)


def _write_reconstruction(folder: str | None, image: str, png: bytes) -> str | None:
    if folder is None:
        return None
    target = Path(folder) / f"{Path(image).stem}.reconstruction.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)
    return str(target)


def _patch_list(text: str) -> list[int]:
    try:
        return [int(index) for index in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of patch indices") from None


def _detect(client: Any, args: argparse.Namespace) -> None:
    images = [_read(path, "image") for path in args.images]
    response = client.detect_objects(model=args.model, images=images, threshold=args.threshold)
    rows = [
        (path, x.label, x.score, f"{x.box.xmin}, {x.box.ymin}, {x.box.xmax}, {x.box.ymax}")
        for path, objects in zip(args.images, response, strict=True)
        for x in objects
    ]
    _print(args, response, ("image", "label", "score", "box (xmin, ymin, xmax, ymax)"), rows)


def _segment(client: Any, args: argparse.Namespace) -> None:
    images = [_read(path, "image") for path in args.images]
    response = client.segment_image(
        model=args.model, images=images, subtask=args.subtask, threshold=args.threshold,
        mask_threshold=args.mask_threshold, overlap_mask_area_threshold=args.overlap_mask_area_threshold,
    )
    written = _write_masks(args.masks, args.images, response) if args.masks else {}
    results = [  # the masks as their pixel counts and files: no bytes in a table or JSON
        [
            {"label": s.label, "score": s.score, "pixels": int(s.mask_array.sum()), "mask_file": written.get((i, j))}
            for j, s in enumerate(segments)
        ]
        for i, segments in enumerate(response)
    ]
    rows = [
        (path, s["label"], s["score"], s["pixels"], s["mask_file"] or "")
        for path, segments in zip(args.images, results, strict=True)
        for s in segments
    ]
    plain = {"results": results, "metadata": _plain(response.metadata)}
    _print(args, plain, ("image", "label", "score", "pixels", "mask file"), rows)


def _write_masks(folder: str, paths: Sequence[str], response: Any) -> dict[tuple[int, int], str]:
    """Each segment's PNG mask as FOLDER/<image name>.<segment>.<label>.png; the files by
    (image, segment)."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, (path, segments) in enumerate(zip(paths, response, strict=True)):
        for j, segment in enumerate(segments):
            label = "".join(c if c.isalnum() or c in "-_" else "_" for c in segment.label)
            file = target / f"{Path(path).stem}.{j}.{label}.png"
            file.write_bytes(segment.mask)
            written[(i, j)] = str(file)
    return written


def _tokenize(client: Any, args: argparse.Namespace) -> None:
    response = client.tokenize(model=args.model, texts=args.texts, text_pairs=args.pair)
    rows = [(t, " ".join(e.tokens), " ".join(map(str, e.input_ids))) for t, e in zip(args.texts, response, strict=True)]
    _print(args, response, ("text", "tokens", "input_ids"), rows)


def _detokenize(client: Any, args: argparse.Namespace) -> None:
    response = client.detokenize(model=args.model, sequences=[args.ids])
    _print(args, response, ("text",), [(t,) for t in response])


def _tag(client: Any, args: argparse.Namespace) -> None:
    response = client.tag_tokens(model=args.model, texts=args.texts, aggregation=args.aggregation)
    rows = [(e.entity_group or e.entity, e.word, e.score, e.start, e.end) for r in response for e in r]
    _print(args, response, ("entity", "word", "score", "start", "end"), rows)


def _answer(client: Any, args: argparse.Namespace) -> None:
    response = client.answer(model=args.model, questions=[args.question], contexts=[args.context], top_k=args.top_k)
    rows = [(a.answer, a.score, a.start, a.end) for r in response for a in r]
    _print(args, response, ("answer", "score", "start", "end"), rows)


def _fill_mask(client: Any, args: argparse.Namespace) -> None:
    response = client.fill_mask(model=args.model, texts=args.texts, top_k=args.top_k, targets=args.targets)
    rows = [(c.token_str, c.score, c.sequence) for r in response for mask in r for c in mask]
    _print(args, response, ("token_str", "score", "sequence"), rows)


def _generation_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options of the generate and caption commands (_add_generation_options)."""
    return {
        "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "num_beams": args.num_beams,
        "stop": args.stop or None,
    }


def _add_generation_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--do-sample", action="store_true")
    sub.add_argument("--temperature", type=float)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--top-p", type=float)
    sub.add_argument("--seed", type=int)
    sub.add_argument("--num-beams", type=int)
    sub.add_argument("--stop", action="append")


def _caption(client: Any, args: argparse.Namespace) -> None:
    images = [_read(path, "image") for path in args.images]
    response = client.caption_image(model=args.model, images=images, **_generation_parameters(args))
    rows = [(path, r.generated_text, r.finish_reason) for path, r in zip(args.images, response, strict=True)]
    _print(args, response, ("image", "generated_text", "finish_reason"), rows)


def _transcribe(client: Any, args: argparse.Namespace) -> None:
    """One line per audio file, or with --timestamps one per segment, word or character."""
    timestamps = {None: False, "segment": True}.get(args.timestamps, args.timestamps)
    parameters = {k: v for k, v in _generation_parameters(args).items() if v not in (None, False)}
    response = client.transcribe(
        model=args.model, audios=[_read(path, "audio") for path in args.audios], return_timestamps=timestamps,
        language=args.language, task=args.task, chunk_length_s=args.chunk_length_s,
        stride_length_s=args.stride_length_s, **parameters,
    )  # fmt: skip
    if not timestamps:
        _print(args, response, ("audio", "text"), [(p, t.text) for p, t in zip(args.audios, response, strict=True)])
        return
    rows = [
        (path, c.timestamp[0], "" if c.timestamp[1] is None else c.timestamp[1], c.text)
        for path, t in zip(args.audios, response, strict=True)
        for c in t.chunks
    ]
    _print(args, response, ("audio", "start", "end", "text"), rows)


def _classify_audio(client: Any, args: argparse.Namespace) -> None:
    audios = [_read(path, "audio") for path in args.audios]
    response = client.classify_audio(model=args.model, audios=audios, top_k=args.top_k)
    _print_labels(args, response, "audio", args.audios)


def _generate(client: Any, args: argparse.Namespace) -> None:
    chunks = []
    for chunk in client.generate_stream(model=args.model, prompt=args.prompt, **_generation_parameters(args)):
        chunks.append(chunk)
        if not args.json:
            print(chunk.text, end="", flush=True)
    if args.json:
        print(json.dumps(_plain(chunks), ensure_ascii=False, indent=2))
    else:
        print(f"\n[{chunks[-1].finish_reason}]" if chunks else "")


def _models(client: Any, args: argparse.Namespace) -> None:
    models = client.list_models()
    rows = [(m.name, m.version, m.task, m.precision, m.execution_provider, m.state) for m in models]
    _print(args, models, ("name", "version", "task", "precision", "provider", "state"), rows)


def _model(client: Any, args: argparse.Namespace) -> None:
    info = client.get_model(model=args.model, version=args.version)
    _print(args, info, ("field", "value"), dataclasses.asdict(info).items())


def _read(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        _fail(option, f"cannot read {path}: {error.strerror}", 2)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS when a CA, a client certificate or --tls is given; else plaintext."""
    if (args.tls_cert is None) != (args.tls_key is None):
        _fail("--tls-cert and --tls-key", "give both (mTLS), or neither", 2)
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca, "--tls-ca"),  # None: the system's roots
        private_key=_read(args.tls_key, "--tls-key"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
    )


def _client_command(handler: Callable[[Any, argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from onnxserve.client import Client

        with Client(args.target, timeout=args.timeout, credentials=_credentials(args), token=args.token) as client:
            try:
                handler(client, args)
            except grpc.RpcError as error:
                _fail(error.code().name, error.details(), 1)

    return run


# The client subcommands' variables; the server's own are its settings (config_loader.py).
CLIENT_VARIABLES = {
    "target": "ONNXSERVE_TARGET",
    "tls_ca": "ONNXSERVE_CLIENT_TLS_CA",
    "tls_cert": "ONNXSERVE_CLIENT_TLS_CERT",
    "tls_key": "ONNXSERVE_CLIENT_TLS_KEY",
    "token": "ONNXSERVE_TOKEN",
}


def _connection_options() -> argparse.ArgumentParser:
    """Where the client subcommands connect and how; each option has a variable, the option wins.
    The TLS variables are not ONNXSERVE_TLS_CERT and _KEY: those are the server's own."""
    environ = {key: os.environ.get(variable) or None for key, variable in CLIENT_VARIABLES.items()}
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--target", default=environ["target"] or DEFAULT_TARGET, metavar="HOST:PORT",
                       help=f"the server (default: ${CLIENT_VARIABLES['target']}, else {DEFAULT_TARGET})")
    group.add_argument("--tls", action="store_true",
                       help="speak TLS, trusting the system's CAs (implied by --tls-ca and --tls-cert)")
    group.add_argument("--tls-ca", default=environ["tls_ca"], metavar="PEM",
                       help=f"CA bundle that signed the server's certificate; implies TLS "
                            f"(default: ${CLIENT_VARIABLES['tls_ca']})")
    group.add_argument("--tls-cert", default=environ["tls_cert"], metavar="PEM",
                       help=f"client certificate chain, for a server that requires mTLS "
                            f"(default: ${CLIENT_VARIABLES['tls_cert']})")
    group.add_argument("--tls-key", default=environ["tls_key"], metavar="PEM",
                       help=f"the client certificate's private key (default: ${CLIENT_VARIABLES['tls_key']})")
    group.add_argument("--token", default=environ["token"],
                       help=f"bearer token for a server with auth_tokens; prefer the variable, which other "
                            f"users cannot read from the process list (default: ${CLIENT_VARIABLES['token']})")
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a checkpoint to ONNX into a model repository")
    export.add_argument("source", help="a local checkpoint directory, a Hugging Face Hub id, or a .gguf file")
    export.add_argument("--repository", required=True, help="the model repository directory")
    export.add_argument("--name", help="the model's name in the repository (default: the source's)")
    export.add_argument("--task", help="the task (default: detected from config.architectures)")
    export.add_argument("--precision", action="append", choices=tuple(short_names(common_pb2.Precision)),
                        help="a precision to export; repeat for several (default: fp32, fp16 and int8, "
                             "and int4 for text generation; int4 is for text generation only)")
    export.add_argument("--force", action="store_true", help="write variants that miss their gates")
    export.set_defaults(run=_export)

    serve = commands.add_parser(
        "serve", help="serve a model repository over gRPC",
        description="Each flag overrides the ONNXSERVE_* variables, which override the config file; a "
                    "[models.NAME] table still wins for its model. See docs/operations.md.",
    )
    serve.add_argument("--config", help="a TOML config file (default: $ONNXSERVE_CONFIG)")
    add_flags(serve)
    serve.set_defaults(run=_serve)

    connection = _connection_options()

    def rpc(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, parents=[connection])
        sub.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        sub.add_argument("--model", required=name not in ("models",), default=None)
        sub.set_defaults(run=_client_command(handler))
        return sub

    sub = rpc("encode", _encode, "sentence embeddings")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--pooling", choices=("mean", "cls", "last_token"))
    sub.add_argument("--normalize", action="store_true")
    sub = rpc("classify", _classify, "classify texts (or pairs, zero-shot, multiple choice)")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--pair", action="append", help="second segment; once per text")
    sub.add_argument("--top-k", type=int, default=0)
    sub.add_argument("--candidate-labels", nargs="+")
    sub.add_argument("--hypothesis-template")
    sub.add_argument("--multi-label", action="store_true")
    sub = rpc("classify-image", _classify_image, "classify image files (PNG, JPEG, WebP, BMP, GIF, TIFF)")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    sub.add_argument("--top-k", type=int, default=0, help="labels per image (default: 5, as the pipeline)")
    sub = rpc("encode-image", _encode_image, "image embeddings (CLIP models: in the space of their text embeddings)")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    sub.add_argument("--pooling", choices=("cls", "mean"), help="image encoders (default: the [CLS] token's state)")
    sub.add_argument("--normalize", action="store_true")
    sub = rpc("reconstruct", _reconstruct, "reconstruct image files with patches masked (masked image modeling)")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    mask = sub.add_mutually_exclusive_group()
    mask.add_argument("--patches", type=_patch_list, help="the masked patches' indices, e.g. 0,5,6 (every image)")
    mask.add_argument("--mask", metavar="FILE", help="a mask image: its bright patches are masked (every image)")
    sub.add_argument("--seed", type=int, default=0, help="random masks (no --patches or --mask): the draw's seed")
    sub.add_argument("--mask-ratio", type=float, default=0.0, help="random masks: the share masked (default 0.6)")
    sub.add_argument("--output", metavar="FOLDER", help="write each as FOLDER/<image name>.reconstruction.png")
    sub = rpc("detect", _detect, "find objects in image files (boxes in the images' pixels)")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    sub.add_argument("--threshold", type=float, help="keep objects scoring above this (default: 0.5, as the pipeline)")
    sub = rpc("segment", _segment, "segment image files (semantic, instance or panoptic)")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    sub.add_argument("--subtask", choices=("semantic", "instance", "panoptic"),
                     help="default: the model's, as the pipeline picks")
    sub.add_argument("--threshold", type=float, help="instance and panoptic (default: 0.9, as the pipeline)")
    sub.add_argument("--mask-threshold", type=float, help="instance and panoptic (default: 0.5)")
    sub.add_argument("--overlap-mask-area-threshold", type=float, help="instance and panoptic (default: 0.5)")
    sub.add_argument("--masks", metavar="FOLDER",
                     help="write each mask as FOLDER/<image name>.<segment>.<label>.png (mode L, 255 on the segment)")
    sub = rpc("tokenize", _tokenize, "tokenize texts with the model's tokenizer")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--pair", action="append")
    sub = rpc("detokenize", _detokenize, "turn token ids into text")
    sub.add_argument("ids", nargs="+", type=int)
    sub = rpc("tag", _tag, "named entities (token classification)")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--aggregation", default="simple", choices=("none", "simple", "first", "average", "max"))
    sub = rpc("answer", _answer, "extractive question answering")
    sub.add_argument("--question", required=True)
    sub.add_argument("--context", required=True)
    sub.add_argument("--top-k", type=int, default=1)
    sub = rpc("fill-mask", _fill_mask, "predict masked tokens")
    sub.add_argument("texts", nargs="+")
    sub.add_argument("--top-k", type=int, default=5)
    sub.add_argument("--targets", nargs="+")
    sub = rpc("generate", _generate, "generate text, printed as it streams")
    sub.add_argument("prompt")
    _add_generation_options(sub)
    sub = rpc("caption", _caption, "caption image files (image-to-text), one text per image")
    sub.add_argument("images", nargs="+", metavar="IMAGE", help="an image file")
    _add_generation_options(sub)
    sub = rpc("transcribe", _transcribe, "transcribe audio files (WAV, FLAC, OGG/Vorbis, MP3): speech recognition")
    sub.add_argument("audios", nargs="+", metavar="AUDIO", help="an audio file")
    sub.add_argument("--timestamps", nargs="?", const="segment", choices=("segment", "word", "char"),
                     help="per segment (the default; Whisper), word (CTC; Whisper with alignment heads), "
                     "or character (CTC models)")
    sub.add_argument("--language", help="Whisper: the spoken language (default: detected)")
    sub.add_argument("--task", choices=("transcribe", "translate"), help="Whisper: translate to English")
    sub.add_argument("--chunk-length-s", type=float, default=0.0, help="cut long audio into chunks of this length")
    sub.add_argument("--stride-length-s", type=float, default=0.0, help="chunk overlap on each side (chunk / 6)")
    _add_generation_options(sub)
    sub = rpc("classify-audio", _classify_audio, "classify audio files (WAV, FLAC, OGG/Vorbis, MP3)")
    sub.add_argument("audios", nargs="+", metavar="AUDIO", help="an audio file")
    sub.add_argument("--top-k", type=int, default=0, help="labels per audio (default: 5, as the pipeline)")
    rpc("models", _models, "list the served models")
    sub = rpc("model", _model, "describe one model")
    sub.add_argument("--version", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
