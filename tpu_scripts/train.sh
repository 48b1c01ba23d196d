#!/usr/bin/env bash
# Launches training (and evaluation) on every host of the TPU VM.
#   tpu_scripts/train.sh --name=NAME --zone=ZONE --model_dir=gs://BUCKET/runs/X \
#       --data_dir=gs://BUCKET/coco [--experiment=retinanet_spinenet49_coco]
#       [--mode=train_and_eval] [--gin_param=BINDING ...] [--dry_run]
# data_dir holds train-*.tfrecord, val-*.tfrecord and annotations/instances_val2017.json.
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common "$@"
EXPERIMENT=retinanet_spinenet49_coco
MODE=train_and_eval
MODEL_DIR=""
DATA_DIR=""
GIN_PARAMS=()
for arg in "${REST[@]}"; do
  case "$arg" in
    --experiment=*) EXPERIMENT="${arg#*=}" ;;
    --mode=*) MODE="${arg#*=}" ;;
    --model_dir=*) MODEL_DIR="${arg#*=}" ;;
    --data_dir=*) DATA_DIR="${arg#*=}" ;;
    --gin_param=*) GIN_PARAMS+=("${arg#*=}") ;;
    -h|--help) usage_common; exit 0 ;;
    *) die "unknown flag '$arg'" ;;
  esac
done
[[ "$MODEL_DIR" == gs://* ]] || die "--model_dir must be a gs:// path (got '$MODEL_DIR')"
[[ "$DATA_DIR" == gs://* ]] || die "--data_dir must be a gs:// path (got '$DATA_DIR')"
[[ -f "$(dirname "${BASH_SOURCE[0]}")/../gin_configs/experiments/$EXPERIMENT.gin" ]] ||
  die "unknown experiment '$EXPERIMENT' (see gin_configs/experiments/)"
args=(
  python3 -m spinenet_tf.train
  "--gin_file=gin_configs/experiments/$EXPERIMENT.gin"
  --gin_file=gin_configs/runtime/tpu.gin
  "--gin_param=TRAIN_RECORDS='$DATA_DIR/train-*.tfrecord'"
  "--gin_param=VAL_RECORDS='$DATA_DIR/val-*.tfrecord'"
  "--gin_param=VAL_ANNOTATIONS='$DATA_DIR/annotations/instances_val2017.json'"
)
for p in "${GIN_PARAMS[@]+"${GIN_PARAMS[@]}"}"; do
  args+=("--gin_param=$p")
done
args+=("--model_dir=$MODEL_DIR" "--mode=$MODE" --strategy=tpu --tpu=local)
on_all_workers "cd ~/spinenet_tf && $(printf '%q ' "${args[@]}")"
