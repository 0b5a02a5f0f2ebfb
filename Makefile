# `make demo` and `make test` set up .venv themselves when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile

.PHONY: setup demo test test-slow bench coverage timm-coverage experiments quantization clean

setup: $(STAMP)

# torch goes in first, alone, so that pip takes the local CPU wheel and never a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/pathfx groups resnet18
	$(VENV)/bin/pathfx transform resnet18 --mode balance --export out/resnet18_balanced.onnx \
		--plan-out out/resnet18_enorm_plan.json --force
	$(VENV)/bin/pathfx transform resnet18 --mode path --export out/resnet18_path.onnx \
		--plan-out out/resnet18_gsgd_plan.json --force

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# The coverage tables of docs/: every torchvision classifier and zoo model.
coverage: $(STAMP)
	$(VENV)/bin/pathfx zoo --all --out docs/models_table.md --force
	$(VENV)/bin/pathfx zoo --all --mode balance --size 64 --exporter torchscript --out docs/transform_balance.md --force
	$(VENV)/bin/pathfx zoo --all --mode path --size 64 --exporter torchscript --out docs/transform_path.md --force

# The timm tables of docs/: one model per timm module at 64 px (an hour or more per mode on one thread).
timm-coverage: $(STAMP)
	$(VENV)/bin/pathfx zoo --source timm --size 64 --out docs/timm_table.md --force
	$(VENV)/bin/pathfx zoo --source timm --mode balance --size 64 --exporter torchscript --out docs/timm_balance.md --force
	$(VENV)/bin/pathfx zoo --source timm --mode path --size 64 --exporter torchscript --out docs/timm_path.md --force

# The reproduction report docs/experiments.md and its figures in docs/experiments/ (about 15–25 min on one thread).
experiments: $(STAMP)
	$(VENV)/bin/pathfx experiments --force

# The quantization study docs/quantization.md and docs/quantization.png (about 20 min on one thread).
quantization: $(STAMP)
	$(VENV)/bin/pathfx quantization --force

clean:
	rm -rf $(VENV) build *.egg-info
