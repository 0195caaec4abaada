# Two commands do all setup on a fresh machine:
#   make demo   - main job on the embedded default (no download, no GPU)
#   make test   - the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU wheel where there is no GPU; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/dist-llm train experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow and not slurm and not ray"

clean:
	rm -rf runs data/stdlib multirun outputs

# Wheels for bench/gpu_check.sh on an offline GPU machine (Python 3.12, torch preinstalled there):
# the whole dependency tree except torch and its CUDA/triton wheels, as manylinux binaries for
# 3.12 (resolved with a dry-run install report, then downloaded without re-resolving), plus a
# wheel built from DeepSpeed's sdist. `make gpu-wheels WHEEL_PY=/path/to/python` to use another pip.
GPU_PYVER ?= 3.12
WHEEL_PY ?= $(BIN)/python
GPU_PLATFORMS := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels:
	mkdir -p .whl
	# hydra-core's antlr4 runtime is published as an sdist only: build its (pure Python) wheel first.
	$(WHEEL_PY) -m pip wheel -q --no-deps "antlr4-python3-runtime==4.9.3" -w .whl
	$(WHEEL_PY) bench/wheel_list.py requirements pyproject.toml > .whl/requirements.txt
	$(WHEEL_PY) -m pip install -q --dry-run --ignore-installed --only-binary=:all: --python-version $(GPU_PYVER) \
	  $(GPU_PLATFORMS) --implementation cp --find-links .whl --target .whl/.resolve --report .whl/report.json -r .whl/requirements.txt
	$(WHEEL_PY) bench/wheel_list.py pins .whl/report.json > .whl/pins.txt
	$(WHEEL_PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYVER) $(GPU_PLATFORMS) \
	  --implementation cp --find-links .whl -d .whl -r .whl/pins.txt
	$(WHEEL_PY) -m pip wheel -q --no-deps "$$($(WHEEL_PY) bench/wheel_list.py deepspeed pyproject.toml)" -w .whl
	@echo "$$(ls .whl/*.whl | wc -l) wheels in .whl/"
