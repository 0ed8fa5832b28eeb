# moemesh — the two commands a newcomer needs are `make run` and `make test`; both set up the venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_CPU := -m "not gpu and not multi_gpu" -p no:cacheprovider

.PHONY: setup run test test-fast test-gpu bench proto lint helm-lint clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q "triton==3.7.1"
	$(PY) -m pip install -q -e ".[server,dev]"
	touch $@

# The whole mesh (gateway, prefill and decode processes) on the demo model, one request streamed through the SDK,
# then it keeps serving until Ctrl-C (which stops every process).
run: setup
	$(PY) -m moemesh.cli up --model demo --topology pd --demo-prompt "To Sherlock Holmes she is always"

# Two CPU lanes: the kernels run their Triton code under the interpreter (TRITON_INTERPRET must be set before
# triton is imported, so it gets its own process); everything else runs the torch paths.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels $(PYTEST_CPU) -q
	$(PY) -m pytest tests $(PYTEST_CPU) --ignore=tests/kernels -q

test-gpu:
	python3 -m pytest tests -m "gpu" -q

bench: setup
	$(PY) -m bench.run_all

proto: setup
	$(PY) tools/gen_proto.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/check_imports.py

clean:
	rm -rf $(VENV) build *.egg-info
