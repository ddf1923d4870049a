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
QUANT ?=
LORA ?=
BACKEND ?=
FORCE ?=
CFG_BATCH ?=

.PHONY: setup test lock demo engines bench gpu-check clean

setup: $(VENV)/.installed

# GPU=auto|cu13|cu12|none picks the CUDA flavour of torch + TensorRT (auto: from the NVIDIA driver; see
# README "GPU quick start"). CPU machines get the CPU build of torch (plain `torch` from PyPI is a multi-GB
# CUDA 13 build). Every package is installed at the version of lock/<flavour>.txt, the set the suite last
# passed with (`make lock` refreshes it; LOCK=none installs the newest versions instead). The TensorRT 11.4
# Python bindings go to $(VENV)/trt-api/ on every machine, outside the venv's import path:
# tests/test_trt_api.py reads the real API from them on a CPU.
GPU ?= auto
LOCK ?=
# ORT=gpu: onnxruntime-gpu (CUDA execution provider, the fallback where TensorRT is missing) in place of the
# CPU onnxruntime; both install the module `onnxruntime`, so only one can be there.
ORT ?= cpu
ORT_GPU_VERSION := 1.31.1
TORCH_VERSION := 2.13.0
TRT_VERSION := 11.4.0.106
TORCH_CU12_INDEX ?= https://download.pytorch.org/whl/cu128
$(VENV)/.installed: pyproject.toml $(wildcard lock/*.txt)
	rm -f $@
	python3 -m venv $(VENV)
	@# CPU machines (CI): a replica of the GPU test box's python (lock/gpu-box.txt) in $(VENV)/gpu-box, where
	@# tests/test_gpu_check.py runs gpu-check's CPU smoke, so an import the box cannot satisfy fails here; it
	@# installs in the background beside the main venv (a fresh clone's setup: 217 s before, 123 s after, 2-vCPU Xeon)
	if { [ ! -x "$$(command -v nvidia-smi)" ] || [ "$(GPU)" = none ]; } && [ "$(LOCK)" != none ]; then \
	  { python3 -m venv $(VENV)/gpu-box && $(VENV)/gpu-box/bin/python -m pip install -q torch==$(TORCH_VERSION) && \
	    $(VENV)/gpu-box/bin/python -m pip install -q -r lock/gpu-box.txt; } > $(VENV)/gpu-box.log 2>&1 & box=$$!; \
	else box=; fi; \
	flavour=$(GPU); \
	if [ $$flavour = auto ]; then flavour=none; \
	  drv=$$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1); \
	  if [ -n "$$drv" ]; then major=$${drv%%.*}; \
	    if [ $$major -ge 580 ]; then flavour=cu13; elif [ $$major -ge 525 ]; then flavour=cu12; \
	    else echo "make setup: error: NVIDIA driver $$drv is older than R525; update it (R580+ for CUDA 13) or run make setup GPU=none"; exit 2; fi; \
	  fi; \
	fi; \
	lock=lock/$${flavour/none/cpu}.txt; pins="-c $$lock"; \
	if [ "$(LOCK)" = none ]; then pins=; lock=none; fi; \
	echo "make setup: GPU flavour $$flavour (override with GPU=cu13|cu12|none), pins $$lock (none: the newest)"; \
	pip="$(PY) -m pip install -q $$pins"; \
	case $$flavour in \
	  cu13) $$pip torch==$(TORCH_VERSION) && $$pip -e '.[dev,gpu-cu13]' ;; \
	  cu12) $$pip torch==$(TORCH_VERSION) --index-url $(TORCH_CU12_INDEX) && $$pip -e '.[dev,gpu-cu12]' ;; \
	  *) $$pip torch==$(TORCH_VERSION) && $$pip -e '.[dev]' ;; \
	esac && \
	if [ "$(ORT)" = gpu ]; then $(PY) -m pip uninstall -q -y onnxruntime && \
	  $$pip onnxruntime-gpu==$(ORT_GPU_VERSION); fi && \
	echo "$$lock ORT=$(ORT)" > $(VENV)/.lock && \
	if [ -n "$$box" ] && ! wait $$box; then cat $(VENV)/gpu-box.log; \
	  echo "make setup: error: the GPU-box replica venv did not install (log above)"; exit 1; fi
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/trt-api/11 tensorrt-cu13==$(TRT_VERSION) tensorrt-cu13-bindings==$(TRT_VERSION)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/trt-api/10 tensorrt-cu12==10.15.1.29 tensorrt-cu12-bindings==10.15.1.29
	touch $@

# Refresh the pins: the newest versions into a fresh $(LOCK_VENV), the whole suite there, and only if it
# passes, lock/{cpu,cu13,cu12}.txt rewritten from that venv (lock/refresh.py). Commit them with the figures.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) setup VENV=$(LOCK_VENV) GPU=none LOCK=none
	$(MAKE) test VENV=$(LOCK_VENV)
	$(LOCK_VENV)/bin/python lock/refresh.py --venv $(LOCK_VENV) --torch $(TORCH_VERSION) --trt $(TRT_VERSION)

# The suite runs on TEST_WORKERS processes (pytest-xdist, whole files per worker): the engine builds and
# compiles of one file use one core while another file's tests use the other; a third worker takes a core
# while one waits (on a subprocess's timeout, or on a fixture another worker builds). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: setup
	$(PY) -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# Tiny random checkpoint -> its engines (ONNX Runtime on a CPU, TensorRT on a GPU) -> flf2v-run.
demo: setup
	$(VENV)/bin/flf2v-make-tiny $(CKPT) --frames $(DEMO)
	$(VENV)/bin/flf2v-build --ckpt_dir $(CKPT) --out $(DEMO)/engines
	$(VENV)/bin/flf2v-run --ckpt_dir $(CKPT) --engines $(DEMO)/engines --first_frame $(DEMO)/first.png --last_frame $(DEMO)/last.png \
	  --prompt "A red ball rolls across a wooden table" --base_seed 42 \
	  --save_file $(DEMO)/flf2v_tiny.mp4 --metrics $(DEMO)/metrics.json

# make engines CKPT=<checkpoint dir> [PRESET=dynamic|dynamic-480p|720p|<W>x<H>x<frames>] [PRECISION=bf16|fp32]
#              [ENGINES=<folder>] [ATTENTION=plugin|sage] [QUANT=fp8] [STREAM=1] [LORA="a.safetensors[:SCALE] ..."] [BACKEND=aoti] [CFG_BATCH=both] [FORCE=1]
#              (default PRESET: dynamic, every size and aspect ratio; LORA: merged into the DiT;
#               BACKEND: TensorRT on a GPU with TensorRT, else ONNX Runtime; aoti: AOTInductor .pt2 packages;
#               default ENGINES: engines/<target>/<model>-<precision>-<checkpoint>[-lora<set>]/<PRESET>;
#               FORCE=1: replace another checkpoint's engines in ENGINES (FORCE and STREAM: 0, false or
#               no is off, as unset); CFG_BATCH=1|2|both: the DiT layouts, both for torchrun
#               --cfg_parallel; STREAM=1: a DiT that streams its weights from host memory as flf2v-run's
#               memory plan sets, for 24-48 GB cards: TensorRT weight streaming, or with BACKEND=aoti
#               embed/block/head packages fed each block's weights)
engines: setup
	$(VENV)/bin/flf2v-build --ckpt_dir $(CKPT) $(if $(PRESET),--preset $(PRESET)) \
	  $(if $(PRECISION),--precision $(PRECISION)) $(if $(ENGINES),--out $(ENGINES)) \
	  $(if $(ATTENTION),--attention $(ATTENTION)) $(if $(QUANT),--quant $(QUANT)) $(if $(filter-out 0 false no,$(STREAM)),--weight_streaming) $(foreach l,$(LORA),--lora $(l)) $(if $(BACKEND),--backend $(BACKEND)) \
	  $(if $(CFG_BATCH),--cfg_batch $(CFG_BATCH)) $(if $(filter-out 0 false no,$(FORCE)),--force)

bench: setup
	$(VENV)/bin/flf2v-bench --preset tiny --out bench/results
	$(VENV)/bin/flf2v-bench --preset small --out bench/results

# Everything a GPU must prove, in one run of <= 8 minutes, random weights (bench/gpu_check.py): no `setup`,
# so it also runs on a bare GPU image: with $(VENV) when there is one, else $(GPU_PY) with the checkout
# importable as `flf2v` through a symlink in a temporary folder on PYTHONPATH. GPU_CHECK_ARGS e.g. --quick.
GPU_PY ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -x "$(PY)" ]; then exec "$(PY)" -m flf2v.bench.gpu_check $(GPU_CHECK_ARGS); fi; \
	d=$$(mktemp -d) || exit 2; ln -s "$(CURDIR)" "$$d/flf2v" || exit 2; \
	PYTHONPATH="$$d$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PY) -m flf2v.bench.gpu_check $(GPU_CHECK_ARGS); rc=$$?; \
	rm -f "$$d/flf2v"; rmdir "$$d"; exit $$rc

clean:
	rm -rf $(DEMO) .pytest_cache
