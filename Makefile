# `make test` and `make demo` work from a fresh clone: they build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean gpu-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this takes the local CPU wheel; an unpinned torch pulls GBs of CUDA packages.
	# jax[cpu] pins the CPU jaxlib (the package extra stays plain jax for GPU users).
	$(PY) -m pip install -q torch==2.13.0 "jax[cpu]>=0.10"
	$(PY) -m pip install -q transformers==5.24.0 diffusers==0.42.1
	$(PY) -m pip install -q flax==0.12.8 keras==3.15.1
	$(PY) -m pip install -q -e ".[torch,jax,testing,compare,examples,integrations-transformers,integrations-diffusers,integrations-flax,integrations-keras,test,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy sp_common backend_torch backend_jax benchmarks examples
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m examples.demo
	mkdir -p out
	$(PY) -m sp_common --world-size 4 --seq-lens 256,512,1024,2048 \
		--json out/compare.json --plot out/compare.png
	$(PY) -m examples.transformers_lm

# Ratios against the raw collectives on 4 gloo ranks / 4 JAX CPU devices (not part of `make test`).
bench: $(STAMP)
	# The peer for the padding row: its sp_sharding module alone (imports shimmed in peers.py).
	$(PY) -m pip install -q --no-deps vllm-omni==0.30.0
	$(PY) -m pip install -q --no-deps yunchang==0.6.4
	$(PY) -m benchmarks.run

# On GPU machines (not part of `make test`): tests/test_gpu.py on NCCL ranks and a JAX GPU mesh,
# then sp-compare on N GPUs. It needs CUDA builds of torch and/or jax, which the CPU-only .venv
# lacks: make gpu-check GPU_PYTHON=/path/to/cuda-env/bin/python. A framework that sees fewer than
# 2 GPUs is skipped, with the reason printed.
GPU_PYTHON ?= $(PY)

gpu-check: $(if $(filter $(PY),$(GPU_PYTHON)),$(STAMP))
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(GPU_PYTHON) -m pytest -q -m gpu tests/test_gpu.py
	@t=$$($(GPU_PYTHON) -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0); \
	j=$$($(GPU_PYTHON) -c 'import jax; print(len(jax.devices("gpu")))' 2>/dev/null || echo 0); \
	if [ "$$t" -ge 2 ] && [ "$$j" -ge "$$t" ]; then b=torch,jax; n=$$t; \
	elif [ "$$t" -ge 2 ]; then b=torch; n=$$t; \
	elif [ "$$j" -ge 2 ]; then b=jax; n=$$j; \
	else echo "gpu-check: sp-compare skipped: torch sees $$t CUDA device(s), JAX $$j GPU(s);" \
		"it needs 2"; exit 0; fi; \
	set -x; $(GPU_PYTHON) -m sp_common --device gpu --backends $$b --world-size $$n \
		--shape 1,$$((n * 512)),$$((n * 32)) --heads $$n --seq-lens $$((n * 128)),$$((n * 512))

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
