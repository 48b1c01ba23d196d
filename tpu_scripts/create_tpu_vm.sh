#!/usr/bin/env bash
# Creates a Cloud TPU VM with TensorFlow 2.20.
#   tpu_scripts/create_tpu_vm.sh --name=NAME --zone=ZONE [--accelerator_type=v4-8]
#       [--version=tpu-vm-tf-2.20.0-pjrt] [--dry_run]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
ACCELERATOR=v4-8
VERSION=tpu-vm-tf-2.20.0-pjrt
for arg in "${REST[@]}"; do
  case "$arg" in
    --accelerator_type=*) ACCELERATOR="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    -h|--help) usage_common; exit 0 ;;
    *) die "unknown flag '$arg'" ;;
  esac
done
extra="$(project_flag)"
# shellcheck disable=SC2086
run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" $extra \
  --accelerator-type="$ACCELERATOR" --version="$VERSION"
