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
DEMO_SWEEP_CONFIG := configs/sweep_synthetic.toml
DEMO_DATA := data/synthetic
DEMO_RUN := runs/synthetic
DEMO_SWEEP := runs/synthetic_sweep
DEMO_ARTIFACTS := artifacts/synthetic
# `make demo TRACK=1` also logs the run to MLflow (./mlruns; docs/experiment-tracking.md).
TRACK :=

.PHONY: demo test loadtest venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_INDEX) $(TORCH) $(FBGEMM)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	touch $@

# The demo: the world, the teacher, the student found by a small sweep on simulated impact,
# the served models under load, and the ship decision. If no student meets the sweep's rule,
# it stops after printing why (the sweep's table and report), with nothing to ship.
demo: $(INSTALLED)
	$(BIN)/recdistill data synthetic --config $(DEMO_CONFIG) --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN) $(DEMO_SWEEP) $(DEMO_ARTIFACTS)
	$(BIN)/recdistill train --config $(DEMO_CONFIG) --data $(DEMO_DATA) --out $(DEMO_RUN) \
	    $(if $(TRACK),--track)
	$(BIN)/recdistill report --run $(DEMO_RUN)
	$(BIN)/recdistill sweep --config $(DEMO_SWEEP_CONFIG) --data $(DEMO_DATA) --out $(DEMO_SWEEP) \
	    --jobs 2 $(if $(TRACK),--track)
	@test -d $(DEMO_SWEEP)/best || { echo "no student meets the rule: $(DEMO_SWEEP)/report/report.md says why; nothing to ship"; exit 0; }; \
	set -e; \
	for model in popularity teacher; do \
	    $(BIN)/recdistill export --run $(DEMO_RUN) --model $$model --out $(DEMO_ARTIFACTS)/$$model; \
	done; \
	$(BIN)/recdistill export --run $(DEMO_SWEEP) --model best --out $(DEMO_ARTIFACTS)/student; \
	$(BIN)/python -m loadtest --artifact $(DEMO_ARTIFACTS)/student --run-time 20s --out runs/loadtest; \
	$(BIN)/recdistill abtest --config configs/ab.toml --out runs/ab; \
	$(BIN)/recdistill abtest --config configs/ab_interleaving.toml --out runs/ab_interleaving

test: $(INSTALLED)
	$(BIN)/python -m pytest

# The demo's student under load (make demo first): 8 users for 20 s, p99 must stay < 50 ms.
loadtest: $(INSTALLED)
	@test -f $(DEMO_ARTIFACTS)/student/manifest.json || \
	    { echo "no $(DEMO_ARTIFACTS)/student: run make demo first"; exit 2; }
	$(BIN)/python -m loadtest --artifact $(DEMO_ARTIFACTS)/student --out runs/loadtest

clean:
	rm -rf $(VENV) data/synthetic runs artifacts
