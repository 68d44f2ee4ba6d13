# make setup | demo | test | cv | compare-precision [OFFLINE=1] | bench [OFFLINE=1] | report BASE=<rev> | gpu-memory  (README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Stage commands run `python`: it must be the virtual environment's.
export PATH := $(BIN):$(PATH)

# The embedded offline default: synthetic BreakHis-layout data and a tiny random Gemma 3 built locally.
OFFLINE_PARAMS := -S data.source=synthetic -S model.id=tiny-gemma3
DEMO_EXP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test cv compare-precision bench report gpu-memory

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

# The cross-validation (cv/dvc.yaml): joins the DVC project (.dvcignore keeps it out until it has run), then runs.
cv: setup
	sed -i.bak '\#^/cv/dvc.yaml$$#d' .dvcignore && rm .dvcignore.bak
	$(BIN)/dvc repro cv/dvc.yaml

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
