"""Tiny random transformers checkpoints, built locally for parity tests.

Nothing here touches the Hugging Face Hub: each checkpoint is a randomly initialised model from a
small config plus a fast tokenizer trained on `CORPUS`, written with `save_pretrained` so that
`transformers.pipeline(task, model=directory)` and optimum's ONNX exporter load it offline.
Everything is seeded, so a kind always gives the same weights and the same vocabulary.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from tokenizers import pre_tokenizers as pre
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizerFast,
    BertConfig,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    DistilBertTokenizerFast,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizerFast,
    MarianConfig,
    MarianMTModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaModel,
    RobertaTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    T5TokenizerFast,
)

SEED = 0

# The default widget example of Chinese extractive QA models (e.g. uer/roberta-base-chinese-extractive-qa).
CHINESE_QA_QUESTION = "著名诗歌《假如生活欺骗了你》的作者是"
CHINESE_QA_CONTEXT = (
    "普希金从那里学习人民的语言，吸取了许多有益的养料，这一切对普希金后来的创作产生了很大的影响。"
    "这两年里，普希金创作了不少优秀的作品，如《囚徒》、《致大海》、《致凯恩》和《假如生活欺骗了你》"
    "等几十首抒情诗，叙事诗《努林伯爵》，历史剧《鲍里斯·戈都诺夫》，以及《叶甫盖尼·奥涅金》前六章。"
)

NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

_ENCODER_POSITIONS = 512  # question answering needs room for the pipeline's default 384 window
_DECODER_POSITIONS = 256

_SUBJECTS = (
    "The cat", "A young engineer", "My neighbour", "The old fisherman", "Our team", "Marie Curie",
    "José", "Zoë", "The committee", "A curious child", "Dr. Smith", "The café owner", "Google",
    "The United Nations", "Ada Lovelace", "Björn", "François", "Angela Merkel",
)  # fmt: skip
_VERBS = (
    "visited", "painted", "ordered", "described", "photographed", "forgot", "repaired",
    "celebrated", "wrote about", "walked past", "loved", "hated", "recommended", "ignored",
)  # fmt: skip
_OBJECTS = (
    "a naïve robot", "the old bridge", "three red apples", "the museum", "a crème brûlée",
    "the quiet library", "an electric guitar", "the résumé", "a small boat", "the river",
    "the new phone", "a cup of coffee", "the mountains", "an über-long movie",
)  # fmt: skip
_PLACES = (
    "in Zürich", "in São Paulo", "near the café", "in Paris", "in New York", "in Kraków",
    "at the harbour", "in Montréal", "in Tokyo", "in Reykjavík", "in Berlin", "at Microsoft",
)  # fmt: skip
_TIMES = (
    "on Monday", "in 1999", "at 7:30", "after 42 minutes", "last summer", "on 12 May 2021",
    "twice", "for 3.5 hours", "before 10,000 people arrived", "yesterday", "at 06:45 UTC",
)  # fmt: skip
_ENDINGS = (".", ".", ".", "!", "...", " 🙂", " 🚀", "! 🙂")
_OPINIONS = (
    "I really loved this film", "The service was terrible", "What a wonderful day",
    "This is the worst coffee I have ever had", "The hotel was clean and friendly",
    "Nothing works and nobody answers", "The concert was absolutely amazing",
    "It was okay, nothing special", "I would not recommend it to anyone",
)  # fmt: skip
_ZH_SUBJECTS = ("我", "他们", "老师", "学生们", "我的朋友", "那位诗人", "我们的团队", "妈妈")
_ZH_VERBS = ("喜欢", "学习", "参观了", "写了", "阅读", "讨论", "记得")
_ZH_OBJECTS = (
    "北京的博物馆", "中国历史", "一首诗歌", "数学", "音乐", "上海的公园", "那本小说", "长城", "春天的花",
)  # fmt: skip
_ZH_ENDINGS = ("。", "！", "？", "。🙂")
_FIXED = (
    "東京で寿司を食べました。",
    "今日はいい天気ですね。",
    "서울은 아름다운 도시입니다.",
    "我在Zürich喝了一杯咖啡 ☕",
    "The price is 1,234.56 € or $99.",
    "Call +41 44 123 45 67 before 9 pm.",
    "Naïve    questions  deserve   patient answers.",
    "Spaces     everywhere  and\ttabs\there.",
    "🙂🙂🚀 launch day!",
    "你好，世界！今天天气很好。",
    "Hello, world! I love this so much.",
    "The quick brown fox jumps over the lazy dog.",
    "e = mc² and π ≈ 3.14159",
)


def _corpus() -> list[str]:
    rng = random.Random(SEED)
    english = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}{rng.choice(_ENDINGS)}"
        for _ in range(240)
    ]
    # Runs of spaces must survive tokenization with correct offsets, so some sentences have them.
    spaced = ["  ".join(sentence.split(" ")) for sentence in english[:20:2]]
    questions = [f"Who {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}?" for _ in range(30)]
    questions += [f"Where did {rng.choice(_SUBJECTS)} go {rng.choice(_TIMES)}?" for _ in range(30)]
    opinions = [f"{rng.choice(_OPINIONS)}{rng.choice(_ENDINGS)}" for _ in range(40)]
    chinese = [
        f"{rng.choice(_ZH_SUBJECTS)}{rng.choice(_ZH_VERBS)}{rng.choice(_ZH_OBJECTS)}{rng.choice(_ZH_ENDINGS)}"
        for _ in range(60)
    ]
    return [
        *english,
        *spaced,
        *questions,
        *opinions,
        *chinese,
        *_FIXED,
        CHINESE_QA_QUESTION,
        CHINESE_QA_CONTEXT,
    ]


CORPUS: list[str] = _corpus()


# Backend tokenizers, trained on the whole corpus so that every character in it has a token.
# Only BpeTrainer is used: it gives the same vocabulary in every process, whereas WordPieceTrainer
# and UnigramTrainer order ties by hash and change between runs. WordPiece and Unigram models are
# built from BPE pieces instead. The backends are cached because several kinds share one;
# PreTrainedTokenizerFast deep-copies the object it is given, so the cached one is never mutated.


def _bpe_pieces(
    normalizer: normalizers.Normalizer | None, pre_tokenizer: pre.PreTokenizer, vocab_size: int
) -> Tokenizer:
    """A BPE trained on CORPUS without special tokens: a source of pieces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    return tokenizer


def _in_id_order(vocabulary: dict[str, int]) -> list[str]:
    return sorted(vocabulary, key=vocabulary.__getitem__)


def _bert_normalizer() -> normalizers.Normalizer:
    # handle_chinese_chars puts spaces around each CJK character: one token per character.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=False)


@cache
def _wordpiece() -> Tokenizer:
    """BERT and DistilBERT: [CLS] A [SEP] B [SEP], with token type ids."""
    pieces = _in_id_order(_bpe_pieces(_bert_normalizer(), pre.BertPreTokenizer(), 600).get_vocab())
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Every piece may start a word or continue one, so every word of the corpus is covered.
    tokens = [*special, *pieces, *(f"##{piece}" for piece in pieces)]
    tokenizer = Tokenizer(models.WordPiece({token: index for index, token in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(special)
    tokenizer.normalizer = _bert_normalizer()
    tokenizer.pre_tokenizer = pre.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, tokens.index(token)) for token in ("[CLS]", "[SEP]")],
    )
    return tokenizer


def _byte_level_bpe(special: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=special,
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@cache
def _roberta_bpe() -> Tokenizer:
    """RoBERTa and BART: <s> A </s></s> B </s>, offsets trimmed of the leading space."""
    tokenizer = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer.post_processor = processors.RobertaProcessing(
        sep=("</s>", tokenizer.token_to_id("</s>")),
        cls=("<s>", tokenizer.token_to_id("<s>")),
        trim_offsets=True,
        add_prefix_space=False,
    )
    return tokenizer


@cache
def _gpt2_bpe() -> Tokenizer:
    tokenizer = _byte_level_bpe(["<|endoftext|>"])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


@cache
def _llama_bpe() -> Tokenizer:
    """Llama 2 style: BPE over ▁-prefixed words (runs of spaces kept), <s> prepended."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    # LlamaTokenizerFast rebuilds this same template from add_bos_token/add_eos_token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return tokenizer


def _unigram(special: list[str]) -> Tokenizer:
    """Sentencepiece-like (T5, Marian): words split on whitespace, ▁-prefixed, </s> appended."""
    pre_tokenizer = pre.Sequence([pre.WhitespaceSplit(), pre.Metaspace(replacement="▁", prepend_scheme="always")])
    bpe = _bpe_pieces(None, pre_tokenizer, 800)
    # Scores are log frequencies of the pieces in the BPE encoding of the corpus, as a
    # sentencepiece unigram's are; a piece only used inside longer ones counts half.
    counts = Counter(token for text in CORPUS for token in bpe.encode(text, add_special_tokens=False).tokens)
    total = counts.total()
    scored = [(piece, math.log(max(counts[piece], 0.5) / total)) for piece in _in_id_order(bpe.get_vocab())]
    tokenizer = Tokenizer(models.Unigram([(token, 0.0) for token in special] + scored, special.index("<unk>")))
    tokenizer.add_special_tokens(special)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", special.index("</s>"))]
    )
    return tokenizer


@cache
def _t5_unigram() -> Tokenizer:
    return _unigram(["<pad>", "</s>", "<unk>"])


@cache
def _marian_unigram() -> Tokenizer:
    # Marian puts </s> first and <pad> last (added by the wrapper, after the trained pieces).
    return _unigram(["</s>", "<unk>"])


# Transformers tokenizers, the classes the real checkpoints of each family use.


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    return BertTokenizerFast(tokenizer_object=_wordpiece(), do_lower_case=False, model_max_length=_ENCODER_POSITIONS)


def _distilbert_tokenizer() -> PreTrainedTokenizerFast:
    return DistilBertTokenizerFast(
        tokenizer_object=_wordpiece(), do_lower_case=False, model_max_length=_ENCODER_POSITIONS
    )


def _roberta_tokenizer() -> PreTrainedTokenizerFast:
    return RobertaTokenizerFast(tokenizer_object=_roberta_bpe(), model_max_length=_ENCODER_POSITIONS)


def _bart_tokenizer() -> PreTrainedTokenizerFast:
    return BartTokenizerFast(tokenizer_object=_roberta_bpe(), model_max_length=_DECODER_POSITIONS)


def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    token = "<|endoftext|>"
    return GPT2TokenizerFast(
        tokenizer_object=_gpt2_bpe(),
        bos_token=token,
        eos_token=token,
        unk_token=token,
        model_max_length=_DECODER_POSITIONS,
    )


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    return LlamaTokenizerFast(
        tokenizer_object=_llama_bpe(),
        pad_token="<pad>",
        legacy=False,
        model_max_length=_DECODER_POSITIONS,
    )


def _t5_tokenizer() -> PreTrainedTokenizerFast:
    # No <extra_id_*> sentinels: span corruption is a pretraining objective, not a served task.
    return T5TokenizerFast(tokenizer_object=_t5_unigram(), extra_ids=0, model_max_length=_DECODER_POSITIONS)


def _marian_tokenizer() -> PreTrainedTokenizerFast:
    # Transformers has no fast Marian class; tokenizer_config.json then names
    # PreTrainedTokenizerFast, which AutoTokenizer loads from tokenizer.json.
    return PreTrainedTokenizerFast(
        tokenizer_object=_marian_unigram(),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=_DECODER_POSITIONS,
    )


# Models. Parity tests need greedy outputs that vary, but a random decoder whose output
# projection is tied to its input embeddings mostly predicts the token it was just fed. GPT-2
# escapes that with a large initializer_range; T5 and Marian untie their heads (as flan-t5 does),
# since with tied heads no initializer tried helped. BART cannot: transformers 4.57 does not
# reload an untied BART's encoder and decoder embeddings, so it stays tied (see _bart).


def _labels(*names: str) -> dict[str, dict]:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }


def _bert(tokenizer: PreTrainedTokenizerFast, **extra: object) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=_ENCODER_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _distilbert(tokenizer: PreTrainedTokenizerFast, **extra: object) -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=_ENCODER_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _roberta(tokenizer: PreTrainedTokenizerFast, **extra: object) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        # RoBERTa's position ids start after the padding id, hence the two extra positions.
        max_position_embeddings=_ENCODER_POSITIONS + 2,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def _gpt2(tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=_DECODER_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        initializer_range=0.4,  # larger makes its ONNX export miss the 1e-5 tolerance
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _with_generation(
        GPT2LMHeadModel(config),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _decoder_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special ids a decoder-only config and its generation config both carry."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _randomize(model: PreTrainedModel, suffix: str) -> None:
    """Uniform values in [-0.5, 0.5] for the parameters whose names end with `suffix`."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(suffix):
                parameter.uniform_(-0.5, 0.5)


def _llama(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # heads of 16: ONNX Runtime's GroupQueryAttention wants a multiple of 16
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as Llama 2 70B and Llama 3 use
        max_position_embeddings=_DECODER_POSITIONS,
        initializer_range=0.2,
        **_decoder_token_ids(tokenizer),
    )
    return _with_generation(LlamaForCausalLM(config), **_decoder_token_ids(tokenizer))


def _gemma3(tokenizer: PreTrainedTokenizerFast) -> Gemma3ForCausalLM:
    """Gemma 3 text: sliding and full attention layers with their own rotary bases, a window short
    enough for prompts to cross, q/k norms, a head_dim apart from hidden/heads and a logit softcap."""
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        final_logit_softcapping=4.0,
        tie_word_embeddings=False,  # a tied random head mostly repeats the token it was fed
        max_position_embeddings=_DECODER_POSITIONS,
        initializer_range=0.2,
        **_decoder_token_ids(tokenizer),
    )
    model = Gemma3ForCausalLM(config)
    # Gemma initialises its norms' weights to zero (it scales by 1 + weight); random ones make
    # every norm count.
    _randomize(model, "norm.weight")
    return _with_generation(model, **_decoder_token_ids(tokenizer))


def _qwen2(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """Qwen2: biased q/k/v projections, an untied head."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=_DECODER_POSITIONS,
        initializer_range=0.3,
        **_decoder_token_ids(tokenizer),
    )
    model = Qwen2ForCausalLM(config)
    _randomize(model, "proj.bias")  # initialised to zero, the biases would not be exercised
    return _with_generation(model, **_decoder_token_ids(tokenizer))


def _t5(tokenizer: PreTrainedTokenizerFast) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        # flan-t5 (T5 v1.1) style: gated GELU and an untied head.
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        initializer_factor=0.3,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _with_generation(
        T5ForConditionalGeneration(config),
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _bart(tokenizer: PreTrainedTokenizerFast) -> BartForConditionalGeneration:
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=_DECODER_POSITIONS,
        init_std=0.1,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=eos,
        forced_eos_token_id=eos,
    )
    model = BartForConditionalGeneration(config)
    # Large learned decoder positions make each step's state differ, where the tied head would
    # otherwise repeat the fed token; cross-attention still makes the output depend on the input.
    with torch.no_grad():
        model.model.decoder.embed_positions.weight.mul_(10)
    # As facebook/bart-large-cnn: decoding starts with </s>, then <s> is forced.
    return _with_generation(
        model,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=eos,
        forced_bos_token_id=bos,
        forced_eos_token_id=eos,
    )


def _marian(tokenizer: PreTrainedTokenizerFast) -> MarianMTModel:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=_DECODER_POSITIONS,
        init_std=0.1,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        forced_eos_token_id=eos,
    )
    # As Helsinki-NLP/opus-mt-*: decoding starts with <pad>, which may never be generated.
    return _with_generation(
        MarianMTModel(config),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=pad,
        forced_eos_token_id=eos,
        bad_words_ids=[[pad]],
    )


def _with_generation(model: PreTrainedModel, **settings: object) -> PreTrainedModel:
    model.generation_config = GenerationConfig(**settings)
    return model


_Tokenizer = Callable[[], PreTrainedTokenizerFast]
_Model = Callable[[PreTrainedTokenizerFast], PreTrainedModel]
_SENTIMENT = _labels("NEGATIVE", "POSITIVE")

_BUILDERS: dict[str, tuple[_Tokenizer, _Model]] = {
    "bert-sequence-classification": (
        _bert_tokenizer,
        lambda t: BertForSequenceClassification(_bert(t, **_SENTIMENT)),
    ),
    "bert-sequence-classification-multilabel": (
        _bert_tokenizer,
        lambda t: BertForSequenceClassification(
            _bert(
                t,
                problem_type="multi_label_classification",
                **_labels("sports", "politics", "science", "music"),
            )
        ),
    ),
    "distilbert-sequence-classification": (
        _distilbert_tokenizer,
        lambda t: DistilBertForSequenceClassification(_distilbert(t, **_labels("negative", "neutral", "positive"))),
    ),
    # Default LABEL_0/LABEL_1 names, as many fine-tuned checkpoints have.
    "roberta-sequence-classification": (
        _roberta_tokenizer,
        lambda t: RobertaForSequenceClassification(_roberta(t, num_labels=2)),
    ),
    "bert-feature-extraction": (_bert_tokenizer, lambda t: BertModel(_bert(t))),
    "distilbert-feature-extraction": (_distilbert_tokenizer, lambda t: DistilBertModel(_distilbert(t))),
    "roberta-feature-extraction": (_roberta_tokenizer, lambda t: RobertaModel(_roberta(t))),
    "bert-token-classification": (
        _bert_tokenizer,
        lambda t: BertForTokenClassification(_bert(t, **_labels(*NER_LABELS))),
    ),
    "bert-question-answering": (_bert_tokenizer, lambda t: BertForQuestionAnswering(_bert(t))),
    "roberta-question-answering": (
        _roberta_tokenizer,
        lambda t: RobertaForQuestionAnswering(_roberta(t)),
    ),
    # The WordPiece vocabulary is character-level for CJK, as bert-base-chinese's is.
    "bert-chinese-question-answering": (
        _bert_tokenizer,
        lambda t: BertForQuestionAnswering(_bert(t)),
    ),
    "bert-fill-mask": (_bert_tokenizer, lambda t: BertForMaskedLM(_bert(t))),
    "roberta-fill-mask": (_roberta_tokenizer, lambda t: RobertaForMaskedLM(_roberta(t))),
    "bert-nli": (
        _bert_tokenizer,
        lambda t: BertForSequenceClassification(_bert(t, **_labels("entailment", "neutral", "contradiction"))),
    ),
    "bert-multiple-choice": (_bert_tokenizer, lambda t: BertForMultipleChoice(_bert(t))),
    "gpt2-causal-lm": (_gpt2_tokenizer, _gpt2),
    "llama-causal-lm": (_llama_tokenizer, _llama),
    "gemma3-causal-lm": (_llama_tokenizer, _gemma3),
    "qwen2-causal-lm": (_llama_tokenizer, _qwen2),
    "t5-seq2seq": (_t5_tokenizer, _t5),
    "bart-seq2seq": (_bart_tokenizer, _bart),
    "marian-seq2seq": (_marian_tokenizer, _marian),
}

KINDS: tuple[str, ...] = tuple(_BUILDERS)


def build_checkpoint(kind: str, directory: Path) -> Path:
    """Write the checkpoint `kind` (one of KINDS) into `directory` and return `directory`."""
    make_tokenizer, make_model = _BUILDERS[kind]
    tokenizer = make_tokenizer()
    torch.manual_seed(SEED)
    model = make_model(tokenizer).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
