# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the demo needs training, export, ONNX Runtime and the demo's images: nothing of serving or the tests
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,onnx,demo]'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(DEMO_STAMP)

# one worker per core; tests of one xdist group (tests/conftest.py: Ray, tower families) share a worker
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

demo: $(DEMO_STAMP)
	$(BIN)/rmt-deploy demo

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis

# GPU check (issue 23, docs/gpu.md): `make gpu-wheels` here, then `bash benchmarks/gpu/run.sh` on the GPU machine
.PHONY: gpu-check gpu-wheels
gpu-check:
	bash benchmarks/gpu/run.sh $(GPU_CHECK_ARGS)

gpu-wheels:
	bash benchmarks/gpu/wheels.sh
