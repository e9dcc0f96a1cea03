#!/usr/bin/env bash
# Launchers. Usage:
#   bash run.sh demo                          the whole demo on the embedded synthetic benchmark
#   bash run.sh demo-dlip                     only its DLIP part (teacher, distilled and scratch students)
#   bash run.sh retrieval CONFIG [args...]    train_retrieval.py under torchrun (NPROC processes)
#   bash run.sh eval CONFIG [args...]         evaluation only (--evaluate)
#   bash run.sh caption CONFIG [args...]      train_caption.py under torchrun (NPROC processes)
#   bash run.sh vqa CONFIG [args...]          train_vqa.py under torchrun (NPROC processes)
#   bash run.sh nlvr CONFIG [args...]         train_nlvr.py under torchrun (NPROC processes)
#   bash run.sh video CONFIG [args...]        eval_retrieval_video.py under torchrun (NPROC processes)
#   bash run.sh pretrain [CONFIG] [args...]   ContextBLIP adapter pretraining (default configs/pretrain.yaml)
#   bash run.sh sweep-mask "0.1 0.25 0.5 0.75" [CONFIG] [args...]
#                                             one pretraining per mask rate (+ random) into SWEEP_DIR
#                                             (default outputs/sweep_mask), then summary.csv/summary.md
# NPROC defaults to the number of visible GPUs, or 1 process on CPU.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

nproc_default() {
  "$PYTHON" - <<'PY'
import torch
print(torch.cuda.device_count() or 1)
PY
}

launch() {  # launch SCRIPT ARGS...: plain python for 1 process, torchrun otherwise
  local script=$1; shift
  local n=${NPROC:-$(nproc_default)}
  if [ "$n" -le 1 ]; then
    "$PYTHON" "$script" "$@"
  else
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" "$script" "$@"
  fi
}

DEMO=${DEMO_DIR:-outputs/demo}
D="$DEMO/data"
# DEMO_SEED=N: every training stage with seed N (the data stay the same): the spread over seeds
# is the run-to-run noise of each demo figure (docs/RETRIEVAL.md, Reproducibility).
SEED=(); [ -n "${DEMO_SEED:-}" ] && SEED=("seed=$DEMO_SEED")
stage() {  # stage NAME COMMAND...: run it, append its wall time to $DEMO/stage_seconds.tsv
  local name=$1; shift; local t0=$SECONDS
  echo "=== demo stage: $name"
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - t0)) >> "$DEMO/stage_seconds.tsv"
}

dlip_demo() {  # the DLIP part of the demo (needs $DEMO, $D, $SEED and stage from the demo)
  # DLIP: stage 1's BLIP pretrained further with pretrain_blip.py (which adds the decoder) is the
  # teacher; a smaller student is distilled from it, and the same student pretrained for the same
  # steps without it is the control. All three are fine-tuned the same way (retrieval, captioning);
  # summary.json compares them.
  # Pretraining on the 6,000 train pairs; fine-tuning on the first 2,000 (the demo's 15-minute budget).
  DL="$DEMO/dlip"; rm -rf "$DL"; mkdir -p "$DL"
  "$PYTHON" -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))[:2000], open(sys.argv[2], "w"))' \
    "$D/retrieval/annotation/synthetic_train.json" "$DL/train_pairs.json"
  DATA=("train_file=[$D/retrieval/annotation/synthetic_train.json]" "image_root=$D/retrieval/images" "tokenizer=$D/tokenizer")
  STUDENT=("vit={width: 32, depth: 2, heads: 2, patch_size: 16}" "med_config=configs/demo/med_config_student.json")
  TEACHER=("vit={width: 64, depth: 2, heads: 4, patch_size: 16}" "med_config=configs/demo/med_config_tiny.json")
  stage "8 DLIP teacher pretraining" "$PYTHON" pretrain_blip.py --config configs/demo/dlip_teacher.yaml \
    --output_dir "$DL/teacher/pretrain" --no_progress --opts "${DATA[@]}" \
    "pretrained=$DEMO/retrieval/checkpoint_best.pth" ${SEED[@]+"${SEED[@]}"}
  stage "8 DLIP student, distilled" "$PYTHON" pretrain_blip.py --config configs/demo/dlip_student.yaml \
    --output_dir "$DL/student_distilled/pretrain" --no_progress --opts "${DATA[@]}" \
    "teacher=$DL/teacher/pretrain/checkpoint_last.pth" ${SEED[@]+"${SEED[@]}"}
  stage "8 DLIP student, scratch" "$PYTHON" pretrain_blip.py --config configs/demo/dlip_student.yaml \
    --output_dir "$DL/student_scratch/pretrain" --no_progress --opts "${DATA[@]}" ${SEED[@]+"${SEED[@]}"}
  FT=("image_root=$D/retrieval/images" "ann_root=$D/retrieval/annotation" "tokenizer=$D/tokenizer"
      "train_file=$(realpath "$DL/train_pairs.json")")
  for model in teacher student_distilled student_scratch; do
    if [ "$model" = teacher ]; then ARCH=("${TEACHER[@]}"); else ARCH=("${STUDENT[@]}"); fi
    stage "8 DLIP fine-tuning: $model" bash -c '"$0" train_retrieval.py --config configs/demo/dlip_retrieval.yaml \
        --output_dir "$1/retrieval" --no_progress --opts "${@:2}" && "$0" train_caption.py \
        --config configs/demo/dlip_caption.yaml --output_dir "$1/caption" --no_progress --opts "${@:2}"' \
      "$PYTHON" "$DL/$model" "${FT[@]}" "${ARCH[@]}" "pretrained=$DL/$model/pretrain/checkpoint_last.pth" \
      ${SEED[@]+"${SEED[@]}"}
    # VQA (the DLIP paper's third task): the same for every model, from its pretraining checkpoint
    # (all three towers: ViT, question encoder and answer decoder).
    stage "8 DLIP VQA fine-tuning: $model" "$PYTHON" train_vqa.py --config configs/demo/dlip_vqa.yaml \
      --output_dir "$DL/$model/vqa" --no_progress --opts "vqa_root=$D/vqa" "ann_root=$D/vqa/annotation" \
      "tokenizer=$D/tokenizer" "${ARCH[@]}" "pretrained=$DL/$model/pretrain/checkpoint_last.pth" ${SEED[@]+"${SEED[@]}"}
  done
}

dlip_summary() {  # after dlip_demo; alone on the machine: it times each model's evaluation
  stage "DLIP summary" "$PYTHON" -m analysis.dlip_summary "$DEMO/dlip"
}

vqa_demo() {  # stage 9 (needs $DEMO, $D, $SEED and the DLIP teacher's pretraining checkpoint)
  # BLIP's VQA recipe in small: the three towers from a BLIP pretraining checkpoint (model_base.pth's
  # layout: the DLIP teacher's), then its test accuracy per question type against the best constant
  # answer per type.
  stage "9 VQA" "$PYTHON" train_vqa.py --config configs/demo/vqa.yaml --output_dir "$DEMO/vqa" --no_progress \
    --overwrite --opts "vqa_root=$D/vqa" "ann_root=$D/vqa/annotation" "tokenizer=$D/tokenizer" \
    "pretrained=$DEMO/dlip/teacher/pretrain/checkpoint_last.pth" ${SEED[@]+"${SEED[@]}"}
  stage "VQA report" "$PYTHON" -m analysis.vqa_report "$DEMO/vqa" --train_file "$D/vqa/annotation/vqa_train.json" \
    --test_file "$D/vqa/annotation/vqa_test.json"
}

nlvr_demo() {  # stage 10 (needs $DEMO, $D, $SEED and stage 1's retrieval checkpoint)
  # BLIP's NLVR2 recipe in small: from a retrieval/pretraining checkpoint (its cross-attention copied
  # into both image branches), best epoch by dev accuracy; then dev and test predictions of the best
  # checkpoint, against chance and the best text-only baseline.
  stage "10 NLVR2" bash -c '"$0" train_nlvr.py --config configs/demo/nlvr.yaml --output_dir "$1" --no_progress \
      --overwrite --opts "${@:3}" "pretrained=$2" \
    && "$0" train_nlvr.py --config configs/demo/nlvr.yaml --output_dir "$1" --evaluate --no_progress \
      --opts "${@:3}" "pretrained=$1/checkpoint_best.pth"' \
    "$PYTHON" "$DEMO/nlvr" "$DEMO/retrieval/checkpoint_best.pth" "image_root=$D/nlvr" "ann_root=$D/nlvr/annotation" \
    "tokenizer=$D/tokenizer" ${SEED[@]+"${SEED[@]}"}
  stage "NLVR2 report" "$PYTHON" -m analysis.nlvr_report "$DEMO/nlvr" --data "$D/nlvr"
}

video_demo() {  # stage 11: zero-shot text-video retrieval with stage 1's BLIP on the synthetic clips
  rm -rf "$DEMO/video"
  stage "11 text-video retrieval" "$PYTHON" eval_retrieval_video.py --config configs/demo/video.yaml \
    --output_dir "$DEMO/video" --no_progress --opts "video_root=$D/video/videos" "ann_root=$D/video/annotation" \
    "tokenizer=$D/tokenizer" "pretrained=$DEMO/retrieval/checkpoint_best.pth"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  demo)
    # The whole pipeline on the embedded synthetic benchmark; each stage is also runnable alone
    # (the commands below, or `make demo` again: data generation is skipped when up to date).
    mkdir -p "$DEMO"; : > "$DEMO/stage_seconds.tsv"
    stage "data generation" "$PYTHON" -m data.synthetic --out "$D" --seed 0
    # --overwrite: a second `make demo` trains afresh instead of refusing the previous run's directory.
    stage "1 retrieval fine-tuning" "$PYTHON" train_retrieval.py --config configs/demo/retrieval.yaml \
      --output_dir "$DEMO/retrieval" --no_progress --overwrite --opts "image_root=$D/retrieval/images" \
      "ann_root=$D/retrieval/annotation" "tokenizer=$D/tokenizer" ${SEED[@]+"${SEED[@]}"} "$@"
    # The kept epoch checkpoints x the test captions as they are and templated (docs/TOOLS.md, "Product
    # retrieval workflow"): one table, $DEMO/sweep/sweep.md.
    stage "checkpoint sweep" bash -c '"$0" -m tools captions --input "$1/retrieval/annotation/synthetic_test.json" \
        --template "a photo of {caption}" --new_col caption_aug --output "$2/sweep/test.csv" --overwrite \
      && "$0" -m tools sweep --config configs/demo/retrieval.yaml --output_dir "$2/sweep" --no_progress --overwrite \
        --checkpoints "$2/retrieval/checkpoint_epoch*.pth" --caption_cols caption caption_aug \
        --opts "image_root=$1/retrieval/images" "ann_root=$2/sweep" test_file=test.csv "tokenizer=$1/tokenizer"' \
      "$PYTHON" "$D" "$DEMO"
    stage "fixture evaluation" "$PYTHON" train_retrieval.py --config configs/demo/fixture_eval.yaml \
      --output_dir "$DEMO/fixture_eval" --evaluate --no_progress
    # ContextBLIP adapter pretraining on the synthetic pairs, over the BLIP just trained; then the
    # merged export ($DEMO/pretrain/contextblip_merged.pth) the later stages start from.
    # Stages 2-11 in two lanes of one thread each: these tiny models gain little from a second
    # thread (~10%), so two lanes side by side nearly halve the wall time. Lane 2 (DLIP, then VQA
    # from the DLIP teacher's pretraining checkpoint) logs to $DEMO/lane2.log; each lane's results
    # are deterministic (a run with another thread count sums in another order: docs/PERFORMANCE.md).
    export OMP_NUM_THREADS=1
    ( dlip_demo; vqa_demo ) > "$DEMO/lane2.log" 2>&1 &  # (not &&: set -e must hold inside)
    LANE2=$!
    trap 'kill $LANE2 2>/dev/null || true' EXIT
    echo "=== lane 2 (DLIP, VQA) started: log in $DEMO/lane2.log"
    rm -rf "$DEMO/pretrain"
    stage "2 ContextBLIP pretraining" "$PYTHON" pretrain.py --config configs/demo/pretrain.yaml \
      --output_dir "$DEMO/pretrain" --no_progress \
      --opts "train_file=[$D/retrieval/annotation/synthetic_train.json]" "image_root=$D/retrieval/images" \
             "tokenizer=$D/tokenizer" "pretrained=$DEMO/retrieval/checkpoint_best.pth" ${SEED[@]+"${SEED[@]}"}
    stage "merged export" "$PYTHON" pretrain.py --export "$DEMO/pretrain/checkpoint_last.pth"
    IC=(--opts "image_root=$D/imagecode/image-sets" "ann_root=$D/imagecode/data" "tokenizer=$D/tokenizer"
        "tag_file=$D/imagecode/data/analysis/manual_annotation_valid.yaml")
    stage "3 ImageCoDe zero-shot" "$PYTHON" zero_shot.py --config configs/demo/imagecode_zeroshot.yaml \
      --output_dir "$DEMO/imagecode_zeroshot" --no_progress "${IC[@]}" "pretrained=$DEMO/pretrain/contextblip_merged.pth"
    rm -rf "$DEMO/imagecode_stage1" "$DEMO/imagecode_stage2"
    stage "4 ImageCoDe stage 1" "$PYTHON" finetune_imagecode.py --config configs/demo/imagecode_stage1.yaml \
      --output_dir "$DEMO/imagecode_stage1" --no_progress "${IC[@]}" "pretrained=$DEMO/pretrain/contextblip_merged.pth" \
      ${SEED[@]+"${SEED[@]}"}
    stage "5 ImageCoDe stage 2" "$PYTHON" finetune_imagecode.py --config configs/demo/imagecode_stage2.yaml \
      --output_dir "$DEMO/imagecode_stage2" --no_progress "${IC[@]}" "pretrained=$DEMO/imagecode_stage1/checkpoint_best.pth" \
      ${SEED[@]+"${SEED[@]}"}
    stage "ImageCoDe analysis" "$PYTHON" -m analysis.imagecode report "$DEMO/imagecode_zeroshot/predictions.json" \
      "$DEMO/imagecode_stage1/predictions.json" "$DEMO/imagecode_stage2/predictions.json" \
      --names zero-shot,stage1,stage2 --tags "$D/imagecode/data/analysis/manual_annotation_valid.yaml" \
      --out "$DEMO/imagecode_analysis"
    stage "6 MMVP-VLM" "$PYTHON" eval_mmvp.py --config configs/demo/mmvp.yaml --output_dir "$DEMO/mmvp" \
      --opts "data_root=$D/mmvp" "tokenizer=$D/tokenizer" "pretrained=$DEMO/retrieval/checkpoint_best.pth"
    # A captioner whose ViT starts from stage 1's BLIP; then its test captions against the best
    # constant caption, and a contact sheet.
    stage "7 captioning" "$PYTHON" train_caption.py --config configs/demo/caption.yaml --output_dir "$DEMO/caption" \
      --no_progress --overwrite --opts "image_root=$D/retrieval/images" "ann_root=$D/retrieval/annotation" \
      "tokenizer=$D/tokenizer" "pretrained=$DEMO/retrieval/checkpoint_best.pth" ${SEED[@]+"${SEED[@]}"}
    stage "caption report" "$PYTHON" -m analysis.caption_report "$DEMO/caption" --image_root "$D/retrieval/images" \
      --train_file "$D/retrieval/annotation/synthetic_train.json" --test_file "$D/retrieval/annotation/synthetic_test.json"
    nlvr_demo
    video_demo
    echo "=== waiting for lane 2 (DLIP, VQA: $DEMO/lane2.log)"
    if ! wait $LANE2; then
      tail -40 "$DEMO/lane2.log"; echo "lane 2 failed: the whole log is $DEMO/lane2.log" >&2; exit 1
    fi
    trap - EXIT
    unset OMP_NUM_THREADS
    tail -12 "$DEMO/lane2.log"
    dlip_summary
    "$PYTHON" -m analysis.demo_report "$DEMO"
    echo "Report: $DEMO/REPORT.md"
    ;;
  demo-dlip)
    # The demo's DLIP part alone (after a `make demo` has generated the data).
    mkdir -p "$DEMO"; dlip_demo; dlip_summary; "$PYTHON" -m analysis.demo_report "$DEMO" >/dev/null
    echo "Summary: $DEMO/dlip/summary.md" ;;
  retrieval) cfg=$1; shift; launch train_retrieval.py --config "$cfg" "$@" ;;
  eval) cfg=$1; shift; launch train_retrieval.py --config "$cfg" --evaluate "$@" ;;
  caption) cfg=$1; shift; launch train_caption.py --config "$cfg" "$@" ;;
  vqa) cfg=$1; shift; launch train_vqa.py --config "$cfg" "$@" ;;
  nlvr) cfg=$1; shift; launch train_nlvr.py --config "$cfg" "$@" ;;
  video) cfg=$1; shift; launch eval_retrieval_video.py --config "$cfg" "$@" ;;
  pretrain)
    cfg=configs/pretrain.yaml
    if [ $# -gt 0 ] && [[ $1 != --* ]]; then cfg=$1; shift; fi
    launch pretrain.py --config "$cfg" "$@" ;;
  sweep-mask)
    items=${1:?usage: bash run.sh sweep-mask "RATE ..." [CONFIG] [args...]}; shift
    cfg=configs/pretrain.yaml
    if [ $# -gt 0 ] && [[ $1 != --* ]]; then cfg=$1; shift; fi
    "$PYTHON" -m tasks.sweep_mask --items "$items" --config "$cfg" --out "${SWEEP_DIR:-outputs/sweep_mask}" -- "$@" ;;
  *) sed -n '2,15p' "$0"; exit 1 ;;
esac
