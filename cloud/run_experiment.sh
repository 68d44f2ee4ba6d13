#!/usr/bin/env bash
# One DVC experiment, run by cloud/task.yaml on the job's machine in a checkout of the commit to run; run again on
# the next machine after a spot preemption, it resumes training from the checkpoints on the bucket.
#
# Run (what the task does; tests/test_cloud.py runs it the same way on a local clone):
#   EXP_NAME=cloud-… EXP_ARGS='-S lora.r=16' BUCKET_DIR=/bucket bash cloud/run_experiment.sh
# Required: EXP_NAME (the experiment's name), BUCKET_DIR (the bucket mount: checkpoints/ and mlflow/ go there).
# Optional: EXP_ARGS (`dvc exp run` arguments, shell-quoted), REPO_COMMIT (HEAD must be it), DVC_REMOTE (a remote
# URL instead of the repository's default), MLFLOW_TRACKING_URI (a team server; else the embedded store is kept on
# the bucket), HF_TOKEN_SECRET (a Google Secret Manager secret to read HF_TOKEN from, with this machine's service
# account), JOB_VENV (a ready virtual environment instead of make setup's install; the tests use their own).
# Credentials (HF_TOKEN, KAGGLE_USERNAME, KAGGLE_KEY, MLFLOW_TRACKING_*) come from the environment only; nothing here
# prints them.
set -euo pipefail

log() { echo "[cloud job] $*" >&2; }
# A spot preemption sends SIGTERM to every process: training saves a checkpoint and stops; this script waits for it,
# then exits non-zero (running its EXIT trap) so that the job is recovered rather than counted a success.
trap 'log "SIGTERM: waiting for the experiment to stop"' TERM
need() { [[ -n "${!1:-}" ]] || { log "error: $1 is not set: $2"; exit 2; }; }

need EXP_NAME "set it to the DVC experiment's name (cloud/launch.py does)"
need BUCKET_DIR "set it to the bucket's mount point (/bucket in cloud/task.yaml)"
[[ "$EXP_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || { log "error: EXP_NAME=$EXP_NAME: use letters, digits, '-' and '_'"; exit 2; }
[[ -d "$BUCKET_DIR" ]] || { log "error: BUCKET_DIR=$BUCKET_DIR is not a directory: is the bucket mounted?"; exit 2; }
eval "exp_args=(${EXP_ARGS:-})"  # launch.py shell-quotes them: a value may hold spaces or brackets

head=$(git rev-parse HEAD)
if [[ -n "${REPO_COMMIT:-}" && "$head" != "$(git rev-parse "$REPO_COMMIT^{commit}")" ]]; then
  log "error: the checkout is at $head, not REPO_COMMIT=$REPO_COMMIT"; exit 2
fi

# An experiment name is this job's: its first attempt records the commit and arguments on the bucket, and a later
# attempt (after a preemption) must match them. A job of the same name with another commit or other arguments is
# refused, never taken for this one.
claim="$BUCKET_DIR/jobs/$EXP_NAME"
mkdir -p "$BUCKET_DIR/jobs"
attempted_before=false
if [[ -f "$claim" ]]; then
  if [[ "$(cat "$claim")" != "$(printf 'commit %s\nargs %s' "$head" "${EXP_ARGS:-}")" ]]; then
    log "error: experiment $EXP_NAME belongs to a job of another commit or other arguments ($claim): choose another EXP_NAME"
    exit 2
  fi
  attempted_before=true
else
  printf 'commit %s\nargs %s\n' "$head" "${EXP_ARGS:-}" > "$claim.partial" && mv -f "$claim.partial" "$claim"
fi
# An attempt recovered after an earlier one pushed (preempted while shutting down) has nothing left to do; an
# experiment of that name on origin that no attempt of this job made is refused.
if git ls-remote --refs origin 'refs/exps/*' 2>/dev/null | awk -v name="$EXP_NAME" '
     { n = split($2, part, "/"); if (part[n] == name) found = 1 } END { exit !found }'; then
  if $attempted_before; then
    log "experiment $EXP_NAME is already on origin: nothing to do"; exit 0
  fi
  log "error: an experiment $EXP_NAME is already on origin, made by another job: choose another EXP_NAME"; exit 2
fi

# HF_TOKEN from Secret Manager, read here with the machine's service account: the token never leaves Google Cloud.
if [[ -n "${HF_TOKEN_SECRET:-}" && -z "${HF_TOKEN:-}" ]]; then
  gcloud_errors=$(mktemp)
  if ! HF_TOKEN=$(gcloud secrets versions access latest --secret="$HF_TOKEN_SECRET" 2>"$gcloud_errors"); then
    log "error: cannot read HF_TOKEN from Secret Manager secret $HF_TOKEN_SECRET with this machine's service account:" \
      "$(grep -m1 . "$gcloud_errors")"
    log "grant it roles/secretmanager.secretAccessor on the secret (docs/cloud.md)"
    rm -f "$gcloud_errors"; exit 2
  fi
  rm -f "$gcloud_errors"
  export HF_TOKEN
  log "HF_TOKEN read from Secret Manager secret $HF_TOKEN_SECRET"
fi

# make setup's install. Python 3.11 from uv where the machine's image has another.
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
