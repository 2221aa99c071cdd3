# The README's two commands: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-autoscale demo-models demo-routes down test lint unit sim-image images services clean install uninstall dist \
	constraints llamacpp engine-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

services:
	scripts/install-services

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) services lint llamacpp
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The real engine of tests/test_real_engine.py: llama.cpp compiled once through
# llama-cpp-python (minutes; README) and a tiny GGUF, cached in ~/.cache/aivmm. Built here,
# before pytest, so the first build's progress shows; the image itself (seconds) is built
# on the test session's Docker engine.
llamacpp: $(STAMP)
	$(PY) -m devtools.llamacpp --no-image

# Only the real engine through agent and scheduler (make test runs it too).
engine-check: $(STAMP) services llamacpp
	$(PY) -m pytest -q -p no:cacheprovider tests/test_real_engine.py

sim-image: $(STAMP) services
	$(PY) -m devtools.image $(SIM_IMAGE_ARGS)

# aivmm-agent:local, aivmm-scheduler:local and the sim image, FROM scratch (no registry).
images: $(STAMP) services
	$(PY) -m devtools.images $(IMAGES_ARGS)

demo: $(STAMP) services
	$(PY) -m devtools.demo up

# Scale from zero and back to zero (docs/autoscaling.md); starts the demo first if needed.
demo-autoscale: $(STAMP) services
	$(PY) -m devtools.demo autoscale

# A route split 90/10 over two deployments, one on each demo node (docs/routes.md).
demo-routes: $(STAMP) services
	$(PY) -m devtools.demo routes

# A model fetched from a local hub mirror, with its progress (docs/models.md).
demo-models: $(STAMP) services
	$(PY) -m devtools.demo models

down: $(STAMP)
	$(PY) -m devtools.demo down

clean:
	rm -rf $(VENV) .run .cache

# On a machine: `sudo make install` (agent and scheduler; INSTALL_ARGS=--agent for one, or
# --restart after an upgrade), `sudo make uninstall` (INSTALL_ARGS=--purge: config too).
# No dev venv needed: scripts/install builds the wheel itself (docs/deploy.md).
install:
	scripts/install $(INSTALL_ARGS)

uninstall:
	scripts/install --uninstall $(INSTALL_ARGS)

# dist/aivmm-<version>.tar.gz and dist/aivmm-<version>-py3-none-any.whl; the version is
# pyproject.toml's.
dist: $(STAMP)
	$(PY) -m build --outdir dist .

# scripts/constraints.txt from a fresh resolve of pyproject.toml's dependencies.
constraints:
	rm -rf .cache/constraints && $(PYTHON) -m venv .cache/constraints
	.cache/constraints/bin/pip install -q .
	{ sed -n '/^#/p' scripts/constraints.txt; .cache/constraints/bin/pip freeze --exclude aivmm; } \
		> .cache/constraints.txt && mv .cache/constraints.txt scripts/constraints.txt
