# flf2v: `make demo` (tiny random checkpoint -> engines -> video) and `make test` on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
CKPT ?= $(DEMO)/ckpt
PRESET ?=
PRECISION ?=
ENGINES ?=
ATTENTION ?=

.PHONY: setup test demo engines bench clean

setup: $(VENV)/.installed

# CPU machines get the CPU build of torch from local wheels (plain `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

# Tiny random checkpoint -> its engines (ONNX Runtime on a CPU, TensorRT on a GPU) -> flf2v-run.
demo: setup
	$(VENV)/bin/flf2v-make-tiny $(CKPT) --frames $(DEMO)
	$(VENV)/bin/flf2v-build --ckpt_dir $(CKPT) --out $(DEMO)/engines
	$(VENV)/bin/flf2v-run --ckpt_dir $(CKPT) --engines $(DEMO)/engines --first_frame $(DEMO)/first.png --last_frame $(DEMO)/last.png \
	  --prompt "A red ball rolls across a wooden table" --base_seed 42 \
	  --save_file $(DEMO)/flf2v_tiny.mp4 --metrics $(DEMO)/metrics.json

# make engines CKPT=<checkpoint dir> [PRESET=720p] [PRECISION=bf16|fp32] [ENGINES=<folder>] [ATTENTION=plugin]
engines: setup
	$(VENV)/bin/flf2v-build --ckpt_dir $(CKPT) $(if $(PRESET),--preset $(PRESET)) \
	  $(if $(PRECISION),--precision $(PRECISION)) $(if $(ENGINES),--out $(ENGINES)) \
	  $(if $(ATTENTION),--attention $(ATTENTION))

bench: setup
	$(VENV)/bin/flf2v-bench --preset tiny --out bench/results
	$(VENV)/bin/flf2v-bench --preset small --out bench/results

clean:
	rm -rf $(DEMO) .pytest_cache
