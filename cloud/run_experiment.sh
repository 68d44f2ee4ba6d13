#!/usr/bin/env bash
# One DVC experiment, run by cloud/task.yaml on the job's machine in a checkout of the commit to run; run again on
# the next machine after a spot preemption, it resumes training from the checkpoints on the bucket.
#
# Run (what the task does; tests/test_cloud.py runs it the same way on a local clone):
#   EXP_NAME=cloud-… EXP_ARGS='-S lora.r=16' BUCKET_DIR=/bucket bash cloud/run_experiment.sh
# Required: EXP_NAME (the experiment's name), BUCKET_DIR (the bucket mount: checkpoints/ and mlflow/ go there).
# Optional: EXP_ARGS (`dvc exp run` arguments, shell-quoted), REPO_COMMIT (HEAD must be it), DVC_REMOTE (a remote
# URL instead of the repository's default), MLFLOW_TRACKING_URI (a team server; else the embedded store is kept on
# the bucket), JOB_VENV (a ready virtual environment instead of the README's install; the tests use their own).
# Credentials (HF_TOKEN, KAGGLE_USERNAME, KAGGLE_KEY) come from the environment only; nothing here prints them.
set -euo pipefail

log() { echo "[cloud job] $*" >&2; }
# A spot preemption sends SIGTERM to every process: training saves a checkpoint and stops; this script waits for it,
# then exits non-zero (running its EXIT trap) so that the job is recovered rather than counted a success.
trap 'log "SIGTERM: waiting for the experiment to stop"' TERM
need() { [[ -n "${!1:-}" ]] || { log "error: $1 is not set: $2"; exit 2; }; }

need EXP_NAME "set it to the DVC experiment's name (cloud/launch.py does)"
need BUCKET_DIR "set it to the bucket's mount point (/bucket in cloud/task.yaml)"
[[ -d "$BUCKET_DIR" ]] || { log "error: BUCKET_DIR=$BUCKET_DIR is not a directory: is the bucket mounted?"; exit 2; }
eval "exp_args=(${EXP_ARGS:-})"  # launch.py shell-quotes them: a value may hold spaces or brackets

head=$(git rev-parse HEAD)
if [[ -n "${REPO_COMMIT:-}" && "$head" != "$(git rev-parse "$REPO_COMMIT^{commit}")" ]]; then
  log "error: the checkout is at $head, not REPO_COMMIT=$REPO_COMMIT"; exit 2
fi

# The README's install. Python 3.11 from uv where the machine's image has another.
if [[ -n "${JOB_VENV:-}" ]]; then
  export PATH="$JOB_VENV/bin:$PATH"
else
  python=$(command -v python3.11 || true)
  if [[ -z "$python" ]]; then
    python3 -m pip install --quiet --user uv==0.13.8
    python=$(python3 -m uv python find 3.11 2>/dev/null || { python3 -m uv python install 3.11 >&2 &&
                                                             python3 -m uv python find 3.11; })
  fi
  make setup PYTHON="$python"
  export PATH="$PWD/.venv/bin:$PATH"
fi
export DVC_NO_ANALYTICS=1

# DVC commits the experiment; a fresh machine has no git identity.
export GIT_AUTHOR_NAME="${GIT_AUTHOR_NAME:-medgemma-breakhis cloud job}" GIT_AUTHOR_EMAIL="${GIT_AUTHOR_EMAIL:-cloud-job@localhost}"
export GIT_COMMITTER_NAME="${GIT_COMMITTER_NAME:-$GIT_AUTHOR_NAME}" GIT_COMMITTER_EMAIL="${GIT_COMMITTER_EMAIL:-$GIT_AUTHOR_EMAIL}"

if [[ -n "${DVC_REMOTE:-}" ]]; then
  dvc remote add --local --force --default job "$DVC_REMOTE"  # .dvc/config.local: never committed
fi

# A job recovered after it pushed (preempted while shutting down) has nothing left to do.
if dvc exp list origin --name-only 2>/dev/null | grep -qxF "$EXP_NAME"; then
  log "experiment $EXP_NAME is already on origin: nothing to do"; exit 0
fi

# Without a team server, the embedded MLflow store lives on the bucket between attempts, so the runs of a preempted
# attempt and of the one that resumed it end up in one store. SQLite must not be written on gcsfuse: it is copied.
mlflow_dir="$BUCKET_DIR/mlflow/$EXP_NAME"
if [[ -z "${MLFLOW_TRACKING_URI:-}" ]]; then
  unset MLFLOW_TRACKING_URI
  if [[ -f "$mlflow_dir/mlflow.db" ]]; then
    log "restoring the MLflow store of an earlier attempt from $mlflow_dir"
    cp "$mlflow_dir/mlflow.db" mlflow.db
    [[ -d "$mlflow_dir/mlartifacts" ]] && cp -R "$mlflow_dir/mlartifacts" .
  fi
  save_mlflow() {
    [[ -f mlflow.db ]] || return 0
    mkdir -p "$mlflow_dir"
    cp mlflow.db "$mlflow_dir/mlflow.db.partial" && mv -f "$mlflow_dir/mlflow.db.partial" "$mlflow_dir/mlflow.db"
    [[ -d mlartifacts ]] && cp -R mlartifacts "$mlflow_dir/"
    log "MLflow store saved to $mlflow_dir"
  }
  trap save_mlflow EXIT
fi

# Training checkpoints on the bucket: a preempted job resumes from them on its next machine.
export MEDGEMMA_CHECKPOINTS_DIR="$BUCKET_DIR/checkpoints"

log "dvc pull: the inputs the pipeline has in the DVC remote"
dvc pull --allow-missing dvc.yaml
log "dvc exp run --name $EXP_NAME ${exp_args[*]}"
# dvc dies at once on SIGTERM, which would leave the stage finishing its checkpoint after this script had saved the
# MLflow store. Ignoring SIGTERM in dvc alone (every stage installs its own handler) makes dvc wait for the stage.
( trap '' TERM; exec dvc exp run --name "$EXP_NAME" "${exp_args[@]}" )
log "dvc exp push origin $EXP_NAME: the experiment to git, its outputs to the DVC remote"
dvc exp push origin "$EXP_NAME"
log "done: dvc exp pull origin $EXP_NAME, then dvc exp show"
