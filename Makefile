# `make demo` and `make test` set up .venv themselves when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch goes in first, alone, so that pip takes the local CPU wheel and never a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pathfx groups resnet18
	$(VENV)/bin/pathfx groups zoo:resnet18_typec --input-shape 1,3,32,32

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

bench: $(STAMP)
	$(PY) benchmarks/groups.py

clean:
	rm -rf $(VENV) build *.egg-info
