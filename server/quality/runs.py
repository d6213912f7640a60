"""Running a variant on validation inputs, the same way at export and at load: the output
families (how each task's graphs run on a batch and what one sample's output is), and greedy
decoding and perplexity through the serving code's step model for text generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnxruntime as ort
from onnxserve.server.quality.gates import Sample
from onnxserve.server.runtime.sessions import Session
from onnxserve.server.tasks.generation.causal import open_causal_model
from onnxserve.server.tasks.generation.decoding import StepModel
from onnxserve.server.tasks.generation.logits import log_softmax
from onnxserve.server.tasks.object_detection import corners

from onnxserve.v1 import common_pb2

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
# The outputs the families read: what a probe file stores of PyTorch's.
MAIN_OUTPUTS = (
    "last_hidden_state", "logits", "start_logits", "end_logits", "logits_per_image", "text_embeds", "image_embeds",
    "reconstruction", "pred_boxes", "pred_masks",
)  # fmt: skip


def _feeds(session: ort.InferenceSession, values: Batch) -> Batch:
    """The inputs the graph declares: from `values`, else empty past key values (the first step
    has no cache) and use_cache_branch=False for merged decoders."""
    batch_size = next(iter(values.values())).shape[0]
    feeds = {}
    for meta in session.get_inputs():
        if meta.name in values:
            feeds[meta.name] = values[meta.name]
        elif meta.name == "use_cache_branch":
            feeds[meta.name] = np.zeros([1], dtype=bool)
        else:  # past_key_values.*: [batch, heads, 0, head_dim]
            shape = [batch_size if i == 0 else dim if isinstance(dim, int) else 0 for i, dim in enumerate(meta.shape)]
            feeds[meta.name] = np.zeros(shape, dtype=np.float16 if "float16" in meta.type else np.float32)
    return feeds


def _run_single(sessions: dict[str, ort.InferenceSession], batch: Batch) -> Outputs:
    session = sessions["model"]
    names = [meta.name for meta in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds(session, batch)), strict=True))


def _run_seq2seq(sessions: dict[str, ort.InferenceSession], batch: Batch) -> Outputs:
    """The encoder, then the decoder's first step (its logits are the main output). An encoder
    over images has no attention mask, and its decoder none to take."""
    encoder, decoder = sessions["encoder"], sessions["decoder"]
    (hidden,) = encoder.run(["last_hidden_state"], _feeds(encoder, batch))
    values = {"input_ids": batch["decoder_input_ids"], "encoder_hidden_states": hidden}
    if "attention_mask" in batch:
        values["encoder_attention_mask"] = batch["attention_mask"]
    (logits,) = decoder.run(["logits"], _feeds(decoder, values))
    return {"logits": logits}


def _run_towers(sessions: dict[str, ort.InferenceSession], batch: Batch) -> Outputs:
    """CLIP's towers, each on its own inputs."""
    texts = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    (text_embeds,) = sessions["text"].run(["text_embeds"], texts)
    (image_embeds,) = sessions["vision"].run(["image_embeds"], {"pixel_values": batch["pixel_values"]})
    return {"text_embeds": text_embeds, "image_embeds": image_embeds}


def _kept(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The positions the attention mask keeps: padding is undefined, and fused kernels differ there."""
    return array[mask.astype(bool)]


def _per_token(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    masks = batch["attention_mask"]
    return [Sample(main, main.ravel()) for main in map(_kept, outputs["logits"], masks)]


def _per_sequence(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    return [Sample(row, row.ravel()) for row in outputs["logits"]]


def _per_image(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    """CLIP: each image's logits over the batch's texts."""
    return [Sample(row, row.ravel()) for row in outputs["logits_per_image"]]


def _image_tokens(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    """Image encoders: each image's token states, compared by its first ([CLS]) token's direction."""
    return [Sample(hidden, hidden[0]) for hidden in outputs["last_hidden_state"]]


def _tower_embeddings(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    """CLIP's towers: each text's and each image's embedding."""
    return [Sample(row, row) for name in ("text_embeds", "image_embeds") for row in outputs[name]]


def _reconstructions(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    return [Sample(image, image.ravel()) for image in outputs["reconstruction"]]


def _detections(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    """Object detection: each image's logits per query over the labels and "no object" (the
    label agreement), its boxes' coordinates as the vector compared by direction, and its boxes
    as its regions."""
    rows = zip(outputs["logits"], outputs["pred_boxes"], strict=True)
    return [Sample(logits, boxes.ravel(), corners(boxes)) for logits, boxes in rows]


def _segmentation(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    """Semantic heads: each image's logits as the classes of each pixel, at the logits' resolution
    (the label agreement is per pixel there), the best class of each pixel as its regions. DETR's
    panoptic head: each image's logits per query (the label agreement), its query masks as the
    vector compared by direction, its mask probabilities as its regions."""
    if "pred_masks" in outputs:
        rows = zip(outputs["logits"], outputs["pred_masks"], strict=True)
        return [Sample(logits, masks.ravel(), 1 / (1 + np.exp(-masks))) for logits, masks in rows]
    return [Sample(np.moveaxis(logits, 0, -1), logits.ravel(), logits.argmax(0)) for logits in outputs["logits"]]


def _spans(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    rows = zip(outputs["start_logits"], outputs["end_logits"], batch["attention_mask"], strict=True)
    return [Sample(main, main.ravel()) for main in (np.stack([_kept(s, m), _kept(e, m)]) for s, e, m in rows)]


def _embeddings(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    samples = []
    for hidden, mask in zip(outputs["last_hidden_state"], batch["attention_mask"], strict=True):
        tokens = _kept(hidden, mask)
        if pooling == common_pb2.POOLING_CLS:
            pooled = hidden[0]
        elif pooling == common_pb2.POOLING_LAST_TOKEN:
            pooled = tokens[-1]
        else:
            pooled = tokens.mean(axis=0)
        samples.append(Sample(tokens, pooled))
    return samples


@dataclass(frozen=True)
class OutputFamily:
    """How a task's graphs run on a batch, and each sample's output of a run."""

    run_onnx: Callable[[dict[str, ort.InferenceSession], Batch], Outputs]
    samples: Callable[[Outputs, Batch, int], list[Sample]]
    logits: bool = True


OUTPUT_FAMILIES = {
    "feature-extraction": OutputFamily(_run_single, _embeddings, logits=False),
    "text-classification": OutputFamily(_run_single, _per_sequence),
    "token-classification": OutputFamily(_run_single, _per_token),
    "question-answering": OutputFamily(_run_single, _spans),
    "fill-mask": OutputFamily(_run_single, _per_token),
    "multiple-choice": OutputFamily(_run_single, _per_sequence),
    "text2text-generation": OutputFamily(_run_seq2seq, _per_sequence),
    "image-to-text": OutputFamily(_run_seq2seq, _per_sequence),
    "automatic-speech-recognition": OutputFamily(_run_seq2seq, _per_sequence),
    "image-classification": OutputFamily(_run_single, _per_sequence),
    "ctc-speech-recognition": OutputFamily(_run_single, _per_sequence),  # logits per frame
    "audio-classification": OutputFamily(_run_single, _per_sequence),
    "object-detection": OutputFamily(_run_single, _detections),
    "image-segmentation": OutputFamily(_run_single, _segmentation),
    "zero-shot-image-classification": OutputFamily(_run_single, _per_image),
    "image-feature-extraction": OutputFamily(_run_single, _image_tokens, logits=False),
    "clip_towers": OutputFamily(_run_towers, _tower_embeddings, logits=False),
    "masked_image_modeling": OutputFamily(_run_single, _reconstructions, logits=False),
}


def _untimed(run: Callable[[], np.ndarray]) -> np.ndarray:
    return run()


def _open(session: Session, prompt: Sequence[int], pad_token_id: int, new_tokens: int) -> StepModel:
    return open_causal_model(session, [prompt], pad_token_id, _untimed, rows=1, max_new_tokens=new_tokens)


def greedy(
    session: Session, prompt: Sequence[int], new_tokens: int, eos_token_ids: frozenset[int], pad: int
) -> list[int]:
    """The variant's greedy continuation of `prompt`: `new_tokens` tokens, or fewer up to an EOS."""
    model = _open(session, prompt, pad, new_tokens)
    tokens = [int(model.start()[0].argmax())]
    while len(tokens) < new_tokens and tokens[-1] not in eos_token_ids:
        tokens.append(int(model.step(np.array(tokens[-1:]))[0].argmax()))
    model.release()
    return tokens


def step_perplexity(session: Session, text: Sequence[int], pad_token_id: int) -> float:
    """The variant's perplexity on `text`, fed one token at a time (the fused graph returns only the
    last position's logits). Each position's likelihood is taken as its logits come: a 262k-word
    vocabulary's logits for the whole text, in float64, took 640 MB at load (docs/int8.md)."""
    model = _open(session, text[:1], pad_token_id, len(text))
    likelihoods = [_log_likelihood(model.start()[0], text[1])]
    for token, following in pairwise(text[1:]):
        likelihoods.append(_log_likelihood(model.step(np.array([token]))[0], following))
    model.release()
    return float(np.exp(-np.mean(likelihoods)))


def perplexity(logits: np.ndarray, text: Sequence[int]) -> float:
    """exp of the mean negative log-likelihood of text[1:], given logits[i] predicting text[i + 1]."""
    pairs = zip(logits, text[1:], strict=False)  # the logits may go on past the text's last token
    return float(np.exp(-np.mean([_log_likelihood(row, target) for row, target in pairs])))


def _log_likelihood(logits: np.ndarray, target: int) -> float:
    """log p(target) under one position's logits, in float64."""
    return float(log_softmax(logits.astype(np.float64))[target])


def common_prefix(tokens: Sequence[int], expected: Sequence[int]) -> int:
    pairs = zip(tokens, expected, strict=False)  # the variant may stop at EOS before PyTorch, or after
    return next((index for index, (a, b) in enumerate(pairs) if a != b), min(len(tokens), len(expected)))
