#!/usr/bin/env bash
# Deletes the TPU VM.
#   tpu_scripts/teardown.sh --name=NAME --zone=ZONE [--dry_run]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
for arg in "${REST[@]}"; do
  case "$arg" in
    -h|--help) usage_common; exit 0 ;;
    *) die "unknown flag '$arg'" ;;
  esac
done
extra="$(project_flag)"
# shellcheck disable=SC2086
run gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" $extra --quiet
