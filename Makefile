# `make demo` and `make test` build .venv on first use and refresh it only when the
# project's requirements change; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# The CPU stack verified together (../shared/DESIGN.md). torchrec goes in with --no-deps
# because it declares the CUDA package fbgemm-gpu; fbgemm-gpu-cpu provides the same ops.
TORCH := torch==2.13.0
FBGEMM := fbgemm-gpu-cpu==1.8.0
TORCHREC := torchrec==1.8.0
# On a CUDA machine: make TORCH_INDEX="--index-url <PyTorch's wheel index for your CUDA>" \
#                         FBGEMM=fbgemm-gpu==1.8.0 test
TORCH_INDEX :=

DEMO_CONFIG := configs/synthetic.toml
DEMO_DATA := data/synthetic
DEMO_RUN := runs/synthetic

.PHONY: demo test venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_INDEX) $(TORCH) $(FBGEMM)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	touch $@

demo: $(INSTALLED)
	$(BIN)/recdistill data synthetic --config $(DEMO_CONFIG) --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(BIN)/recdistill train --config $(DEMO_CONFIG) --data $(DEMO_DATA) --out $(DEMO_RUN)
	$(BIN)/recdistill report --run $(DEMO_RUN)

test: $(INSTALLED)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data/synthetic runs
