# `make test` and `make demo` work from a fresh clone: they build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this takes the local CPU wheel; an unpinned torch pulls GBs of CUDA packages.
	# jax[cpu] pins the CPU jaxlib (the package extra stays plain jax for GPU users).
	$(PY) -m pip install -q torch==2.13.0 "jax[cpu]>=0.10"
	$(PY) -m pip install -q -e ".[torch,jax,test,dev,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py
	mkdir -p out
	$(PY) -m sp_common --world-size 4 --seq-lens 256,512,1024,2048 \
		--json out/compare.json --plot out/compare.png

# Ratios against the raw collectives on 4 gloo ranks / 4 JAX CPU devices (not part of `make test`).
bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
