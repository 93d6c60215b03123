# `make demo` and `make test` set everything up in a virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(abspath constraints.txt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,triton]'
	touch $@

demo: install
	$(BIN)/minidisc compress

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) minidisc-demo
