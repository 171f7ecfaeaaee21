# `make demo` and `make test` build .venv on first use and refresh it only when the
# project's requirements change; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# The set-up is `pip install` of the project (docs/set-up.md), with the extras the tests and the
# demo use. The versions live in pyproject.toml alone. torch's CPU build comes first: a wheel
# pip already finds without an index (a wheelhouse in pip's find-links) or else PyTorch's CPU
# index (PyPI's torch for Linux is the CUDA build, several GB). FBGEMM's CPU build stands in
# for the CUDA fbgemm-gpu that torchrec asks for (packaging/fbgemm-gpu-cpu). On a CUDA machine:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu128 FBGEMM= test
TORCH := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
TORCH_INDEX := https://download.pytorch.org/whl/cpu
FBGEMM := ./packaging/fbgemm-gpu-cpu

DEMO_CONFIG := configs/synthetic.toml
DEMO_SWEEP_CONFIG := configs/sweep_synthetic.toml
DEMO_DATA := data/synthetic
DEMO_RUN := runs/synthetic
DEMO_SWEEP := runs/synthetic_sweep
DEMO_ARTIFACTS := artifacts/synthetic
# `make demo TRACK=1` also logs the run to MLflow (./mlruns; docs/experiment-tracking.md).
TRACK :=

.PHONY: demo test loadtest venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile packaging/fbgemm-gpu-cpu/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps --no-index '$(TORCH)' 2>/dev/null || \
	    $(BIN)/pip install --quiet --no-deps --index-url $(TORCH_INDEX) '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[dev]' $(FBGEMM)
	touch $@

# The demo: the world, the teacher, the student found by a small sweep on simulated impact
# against it, the student under load, and the ship decision by interleaving (the design that
# can decide at the demo world's size: docs/simulated-a-b-tests.md). If no student meets the
# sweep's rule, it stops after the sweep's table and its report's reasons: nothing to ship.
demo: $(INSTALLED)
	$(BIN)/recdistill data synthetic --config $(DEMO_CONFIG) --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN) $(DEMO_SWEEP) $(DEMO_ARTIFACTS)
	$(BIN)/recdistill train --config $(DEMO_CONFIG) --data $(DEMO_DATA) --out $(DEMO_RUN) \
	    $(if $(TRACK),--track)
	$(BIN)/recdistill sweep --config $(DEMO_SWEEP_CONFIG) --data $(DEMO_DATA) --out $(DEMO_SWEEP) \
	    --jobs 2 $(if $(TRACK),--track)
	@test -d $(DEMO_SWEEP)/best || { echo "no student meets the rule ($(DEMO_SWEEP)/report/report.md says why): nothing to ship"; exit 0; }; \
	set -ex; \
	$(BIN)/recdistill export --run $(DEMO_RUN) --model teacher --out $(DEMO_ARTIFACTS)/teacher; \
	$(BIN)/recdistill export --run $(DEMO_SWEEP) --model best --out $(DEMO_ARTIFACTS)/student; \
	$(BIN)/python -m loadtest --artifact $(DEMO_ARTIFACTS)/student --run-time 20s --out runs/loadtest; \
	$(BIN)/recdistill abtest --config configs/ab_interleaving.toml --out runs/ab_interleaving

test: $(INSTALLED)
	$(BIN)/python -m pytest

# The demo's student under load (make demo first): 8 users for 20 s, p99 must stay < 50 ms.
loadtest: $(INSTALLED)
	@test -f $(DEMO_ARTIFACTS)/student/manifest.json || \
	    { echo "no $(DEMO_ARTIFACTS)/student: make demo exports one when its sweep chooses a student"; exit 2; }
	$(BIN)/python -m loadtest --artifact $(DEMO_ARTIFACTS)/student --out runs/loadtest

clean:
	rm -rf $(VENV) data/synthetic runs artifacts
