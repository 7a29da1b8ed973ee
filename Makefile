# `make demo` and `make test` work on a fresh machine: they build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; a GPU user picks their build, e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Optional extras installed by `make setup` (and so by `make test` and .ci/run): dev tools,
# the GGUF importer (gguf) and HF transformers, the fused checkpoint's real client (hf).
# `make test EXTRAS=dev` runs the suite without them: their tests skip with a reason.
EXTRAS ?= dev,gguf,hf
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m apex_tune.dev.demo --output-dir demo_output

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) demo_output .pytest_cache
