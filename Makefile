# make setup | demo | test | compare-precision [OFFLINE=1] | bench [OFFLINE=1] | report BASE=<rev> | gpu-memory  (README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Stage commands run `python`: it must be the virtual environment's.
export PATH := $(BIN):$(PATH)

# The embedded offline default: synthetic BreakHis-layout data and a tiny random Gemma 3 built locally.
OFFLINE_PARAMS := -S data.source=synthetic -S model.id=tiny-gemma3
DEMO_EXP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test compare-precision bench report gpu-memory

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# A temporary DVC experiment: the workspace and every tracked file stay as they are; `dvc exp show` lists it.
demo: setup
	$(BIN)/dvc exp run --temp --name $(DEMO_EXP) $(OFFLINE_PARAMS)
	$(BIN)/python -m medgemma_breakhis.reporting $(DEMO_EXP)
	@# The workspace keeps no plot data of its own (DVC warns so); the experiment's plots are rendered from its commit.
	mkdir -p dvc_plots && $(BIN)/dvc plots diff $(DEMO_EXP) --out dvc_plots/$(DEMO_EXP)

test: setup
	$(BIN)/python -m pytest

# bf16 vs fp16 with otherwise identical params, compared from MLflow. OFFLINE=1: the embedded offline default.
compare-precision: setup
	$(BIN)/python -m medgemma_breakhis.precision_comparison $(if $(OFFLINE),$(OFFLINE_PARAMS))

# Images/s of eval.method score against generate on the same model, images and batch size. OFFLINE=1: tiny model.
bench: setup
	$(BIN)/python -m medgemma_breakhis.bench $(if $(OFFLINE),--synthetic $(OFFLINE_PARAMS))

# The pull-request comment, locally: metrics and params against BASE, intervals side by side.
report: setup
	@test -n "$(BASE)" || { echo "usage: make report BASE=<branch, tag or commit>" >&2; exit 2; }
	@$(BIN)/python -m medgemma_breakhis.pr_report $(BASE) $(if $(PLOTS_URL),--plots-url "$(PLOTS_URL)")

# Estimated GPU memory of MedGemma 4B LoRA training per setting, from the model's shapes (no GPU, no download).
gpu-memory: setup
	@$(BIN)/python -m medgemma_breakhis.gpu_memory

# Cloud GPU jobs (README: Cloud GPU jobs): each experiment a SkyPilot managed job on a spot GPU. The engine has its
# own virtual environment and pinned requirements, so the base install does not grow.
CLOUD_VENV := .venv-cloud
CLOUD_BIN := $(abspath $(CLOUD_VENV))/bin

.PHONY: cloud-setup cloud-run cloud-sweep

cloud-setup: $(CLOUD_VENV)/.installed

$(CLOUD_VENV)/.installed: requirements-cloud.txt
	$(PYTHON) -m venv $(CLOUD_VENV)
	$(CLOUD_BIN)/pip install --quiet --disable-pip-version-check -r requirements-cloud.txt
	touch $@

# make cloud-run ARGS='-S lora.r=16' [GPUS=A100:1] [ON_DEMAND=1]; CLOUD_BUCKET=gs://… and HEAD pushed to origin.
CLOUD_FLAGS = $(if $(GPUS),--gpus $(GPUS)) $(if $(ON_DEMAND),--on-demand) $(if $(DRY_RUN),--dry-run)
cloud-run: cloud-setup
	$(CLOUD_BIN)/python cloud/launch.py $(CLOUD_FLAGS) $(ARGS)

# One managed job per value: make cloud-sweep ARGS='-S lora.r=8,16,32' (or ARGS='-S split.fold=1,2,3,4,5').
cloud-sweep: cloud-setup
	$(CLOUD_BIN)/python cloud/launch.py --sweep $(CLOUD_FLAGS) $(ARGS)
