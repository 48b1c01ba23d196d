#!/usr/bin/env bash
# Copies this checkout to every host of the TPU VM and installs it (TensorFlow comes with the
# TPU image; pip keeps it).
#   tpu_scripts/setup_tpu_vm.sh --name=NAME --zone=ZONE [--dry_run]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
for arg in "${REST[@]}"; do
  case "$arg" in
    -h|--help) usage_common; exit 0 ;;
    *) die "unknown flag '$arg'" ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="$(mktemp -d)/spinenet_tf.tar.gz"
run tar -czf "$ARCHIVE" -C "$ROOT" --exclude=.venv --exclude=.git --exclude=runs --exclude=data .
extra="$(project_flag)"
# shellcheck disable=SC2086
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME":~/spinenet_tf.tar.gz --zone="$ZONE" \
  $extra --worker=all
on_all_workers 'mkdir -p ~/spinenet_tf && tar -xzf ~/spinenet_tf.tar.gz -C ~/spinenet_tf && cd ~/spinenet_tf && python3 -m pip install --quiet -e .'
