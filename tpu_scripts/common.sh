#!/usr/bin/env bash
# Shared by the tpu_scripts: flag parsing and a `run` that prints instead of running under
# --dry_run. Each script only calls gcloud and, on the VM, spinenet_tf.train / export.
set -euo pipefail

DRY_RUN=0
NAME="${TPU_NAME:-spinenet-tpu}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${GCP_PROJECT:-}"

usage_common() {
  cat <<USAGE
common flags: --name=TPU_NAME (default \$TPU_NAME or spinenet-tpu)
              --zone=ZONE (default \$TPU_ZONE or us-central2-b)
              --project=PROJECT (default \$GCP_PROJECT or gcloud's default)
              --dry_run (print the commands instead of running them)
USAGE
}

# parse_common "$@": consumes the common flags; the rest is left in REST.
parse_common() {
  REST=()
  for arg in "$@"; do
    case "$arg" in
      --name=*) NAME="${arg#*=}" ;;
      --zone=*) ZONE="${arg#*=}" ;;
      --project=*) PROJECT="${arg#*=}" ;;
      --dry_run) DRY_RUN=1 ;;
      *) REST+=("$arg") ;;
    esac
  done
}

project_flag() {
  if [[ -n "$PROJECT" ]]; then
    printf -- '--project=%s' "$PROJECT"
  fi
}

# run CMD ARGS...: prints the command, quoted, and runs it unless --dry_run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

# on_all_workers 'SHELL COMMAND': runs a command on every host of the TPU VM slice.
on_all_workers() {
  local extra
  extra="$(project_flag)"
  # shellcheck disable=SC2086  # $extra is empty or one flag
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" $extra --worker=all \
    --command="$1"
}

die() {
  echo "error: $*" >&2
  exit 2
}
