# make setup | make demo | make test | make compare-precision [OFFLINE=1]   (see README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Stage commands run `python`: it must be the virtual environment's.
export PATH := $(BIN):$(PATH)

# The embedded offline default: synthetic BreakHis-layout data and a tiny random Gemma 3 built locally.
OFFLINE_PARAMS := -S data.source=synthetic -S model.id=tiny-gemma3
DEMO_EXP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test compare-precision

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# A temporary DVC experiment: the workspace and every tracked file stay as they are; `dvc exp show` lists it.
demo: setup
	$(BIN)/dvc exp run --temp --name $(DEMO_EXP) $(OFFLINE_PARAMS)
	$(BIN)/python -m medgemma_breakhis.reporting $(DEMO_EXP)

test: setup
	$(BIN)/python -m pytest

# bf16 vs fp16 with otherwise identical params, compared from MLflow. OFFLINE=1: the embedded offline default.
compare-precision: setup
	$(BIN)/python -m medgemma_breakhis.precision_comparison $(if $(OFFLINE),$(OFFLINE_PARAMS))
