# The README's two commands: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo down test lint unit sim-image images services clean

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

test: $(STAMP) services lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

sim-image: $(STAMP) services
	$(PY) -m devtools.image $(SIM_IMAGE_ARGS)

# aivmm-agent:local, aivmm-scheduler:local and the sim image, FROM scratch (no registry).
images: $(STAMP) services
	$(PY) -m devtools.images $(IMAGES_ARGS)

demo: $(STAMP) services
	$(PY) -m devtools.demo up

down: $(STAMP)
	$(PY) -m devtools.demo down

clean:
	rm -rf $(VENV) .run .cache
