# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The tested torch. Pinned: an unpinned torch pulls the newest CUDA build (several GB).
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-all bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,onnx,plots]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fxwormhole demo --out demo_out

# Fast default suite: everything not marked slow or gpu.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# On a CUDA machine: the GPU-marked tests and the runtime benchmark table on the GPU (< 8 min).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache build *.egg-info
