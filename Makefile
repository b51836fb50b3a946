# `make test` and `make demo` set up .venv on a fresh machine (torch's CPU wheel first, so pip
# never pulls a CUDA build), then run.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test demo venv lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test,peers]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dit-compress run recipes/w8a8.yaml --model demo --out out-demo --force

lint: $(STAMP)
	$(VENV)/bin/ruff check compress tests eval
