# moemesh — the two commands a newcomer needs are `make run` and `make test`; both set up the venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_CPU := -m "not gpu and not multi_gpu" -p no:cacheprovider

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= moemesh

.PHONY: setup run test test-fast test-gpu bench proto lint helm-lint image clean

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

# The quick lane (about a minute): unit and chart tests, no kernels under the interpreter, no meshes, nothing slow.
test-fast: setup
	$(PY) -m pytest tests/unit tests/helm -m "not gpu and not multi_gpu and not slow" -p no:cacheprovider -q

# The Helm chart rendered by real Helm (embedded, offline) for every value set, strict lint, every object checked
# against Kubernetes' schemas, the commands the pods and images run checked against the CLI, hadolint.
helm-lint: setup
	$(PY) -m pytest tests/helm $(PYTEST_CPU) -q

# The CUDA 13 image (moemesh:VERSION) and the CPU one (moemesh:VERSION-cpu), where a Docker engine runs.
image:
	@docker info > /dev/null 2>&1 || { echo "make image: no Docker engine answers here (docker info failed)" >&2; exit 1; }
	docker build -f Dockerfile -t $(IMAGE):$(VERSION) .
	docker build -f Dockerfile.cpu -t $(IMAGE):$(VERSION)-cpu .

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
