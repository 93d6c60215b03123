# `make demo` and `make test` set everything up in a virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(abspath constraints.txt)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# The transformers releases pyproject allows at its two ends: `make test` also runs the export round trip and
# the built-in example on each, in a small venv layered over $(VENV) (only transformers and its needs differ).
# Change them together with pyproject's bounds.
TRANSFORMERS_ENDS := 5.0.0 5.24.0
ENDS_TESTS := tests/models/test_export.py tests/cli/test_default_run.py
ENDS_VENVS := $(TRANSFORMERS_ENDS:%=.venv-transformers-%)

.PHONY: demo test test-fast lint test-transformers-ends test-dependency-ends install gpu-check docs-options clean

install: $(VENV)/.installed

# DeepSpeed's CPU extensions (cpu_adam, shm_comm) are built once here, not by the first run or test using them:
# see .ci/build_extensions.py.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,triton,eval,tracking]'
	$(BIN)/python .ci/build_extensions.py 2>&1 | grep -v '^\[' || true
	touch $@

demo: install
	$(BIN)/minidisc compress

.venv-transformers-%/.installed: $(VENV)/.installed
	rm -rf .venv-transformers-$*
	$(PYTHON) -m venv .venv-transformers-$*
	$(BIN)/python -c 'import site; print(site.getsitepackages()[0])' > \
	  "$$(.venv-transformers-$*/bin/python -c 'import site; print(site.getsitepackages()[0])')/base-venv.pth"
	grep -v '^transformers==' constraints.txt > .venv-transformers-$*/constraints.txt
	PIP_CONSTRAINT=$(abspath .venv-transformers-$*/constraints.txt) .venv-transformers-$*/bin/pip install -q \
	  transformers==$*
	.venv-transformers-$*/bin/pip install -q --no-deps -e .
	touch $@

test-transformers-ends: $(ENDS_VENVS:%=%/.installed)
	for venv in $(ENDS_VENVS); do echo "== $$venv"; $$venv/bin/python -m pytest -q $(ENDS_TESTS) || exit 1; done

# Both ends of every range pyproject allows, each in its own venv without constraints.txt: a release check by hand
# (.ci/dependency_ends.sh; CUDA builds of torch from PyPI, and the suite once per end). TESTS=... narrows it.
test-dependency-ends:
	bash .ci/dependency_ends.sh $(TESTS)

lint: install
	$(BIN)/ruff check .

# docs/options.md's option table, from RunConfig (tests/cli/test_cli.py fails when they differ).
docs-options: install
	$(BIN)/python -m engine.cli.options_table

# The unit tests: no end-to-end runs, no second process, no Slurm (about 2 minutes on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not multiprocess and not slurm" tests

test: install lint test-transformers-ends
	$(BIN)/python -m pytest tests

# On a machine with an NVIDIA GPU, in the Python environment that holds its CUDA build of torch (not .venv,
# whose torch is the CPU build): kernels' tests on CUDA, the GPU benchmarks, the built-in example in bf16.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh $(PART)

clean:
	rm -rf $(VENV) $(ENDS_VENVS) .venv-lowest .venv-newest .venv-uv minidisc-demo
