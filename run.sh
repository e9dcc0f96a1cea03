#!/usr/bin/env bash
# Launchers. Usage:
#   bash run.sh demo                          the whole demo on the embedded synthetic benchmark
#   bash run.sh retrieval CONFIG [args...]    train_retrieval.py under torchrun (NPROC processes)
#   bash run.sh eval CONFIG [args...]         evaluation only (--evaluate)
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

cmd=${1:-help}; shift || true
case "$cmd" in
  demo)
    DEMO=${DEMO_DIR:-outputs/demo}
    "$PYTHON" -m data.synthetic --out "$DEMO/data" --seed 0
    "$PYTHON" train_retrieval.py --config configs/demo/retrieval.yaml --output_dir "$DEMO/retrieval" "$@"
    "$PYTHON" train_retrieval.py --config configs/demo/fixture_eval.yaml --output_dir "$DEMO/fixture_eval" --evaluate
    # ContextBLIP adapter pretraining on the synthetic pairs, over the BLIP just trained; then the
    # merged export ($DEMO/pretrain/contextblip_merged.pth) the later stages start from.
    rm -rf "$DEMO/pretrain"
    "$PYTHON" pretrain.py --config configs/demo/pretrain.yaml --output_dir "$DEMO/pretrain" --no_progress \
      --opts "train_file=[$DEMO/data/retrieval/annotation/synthetic_train.json]" \
             "image_root=$DEMO/data/retrieval/images" "tokenizer=$DEMO/data/tokenizer" \
             "pretrained=$DEMO/retrieval/checkpoint_best.pth"
    "$PYTHON" pretrain.py --export "$DEMO/pretrain/checkpoint_last.pth"
    "$PYTHON" - "$DEMO" <<'PY'
import json, sys
from pathlib import Path
demo = Path(sys.argv[1])
last = json.loads((demo / "retrieval" / "log.txt").read_text().splitlines()[-1])
best = [json.loads(l) for l in (demo / "retrieval" / "log.txt").read_text().splitlines() if "test_r_mean" in l][-1]
fx = json.loads((demo / "fixture_eval" / "evaluate.txt").read_text().splitlines()[-1])
print("\nDemo results")
print(f"  retrieval (synthetic test, best val epoch {best['epoch']}): "
      f"text->image R@1 {best['test_img_r1']:.1f}, image->text R@1 {best['test_txt_r1']:.1f}, r_mean {best['test_r_mean']:.1f}")
print(f"  official-layout fixture checkpoint: txt_r1 {fx['test_txt_r1']:.1f}, img_r1 {fx['test_img_r1']:.1f} "
      "(the original BLIP code gives 0.0 / 16.7)")
pt = [json.loads(l) for l in (demo / "pretrain" / "log.txt").read_text().splitlines()]
print(f"  ContextBLIP pretraining ({len(pt)} epochs, frozen BLIP): ITM loss {pt[0]['train_loss_itm']:.3f} -> "
      f"{pt[-1]['train_loss_itm']:.3f}, TMIM loss {pt[0]['train_loss_tmim']:.3f} -> {pt[-1]['train_loss_tmim']:.3f} "
      f"(epoch means); masks in {demo / 'pretrain' / 'masks'}")
PY
    ;;
  retrieval) cfg=$1; shift; launch train_retrieval.py --config "$cfg" "$@" ;;
  eval) cfg=$1; shift; launch train_retrieval.py --config "$cfg" --evaluate "$@" ;;
  pretrain)
    cfg=configs/pretrain.yaml
    if [ $# -gt 0 ] && [[ $1 != --* ]]; then cfg=$1; shift; fi
    launch pretrain.py --config "$cfg" "$@" ;;
  sweep-mask)
    items=${1:?usage: bash run.sh sweep-mask "RATE ..." [CONFIG] [args...]}; shift
    cfg=configs/pretrain.yaml
    if [ $# -gt 0 ] && [[ $1 != --* ]]; then cfg=$1; shift; fi
    "$PYTHON" -m utils.sweep --items "$items" --config "$cfg" --out "${SWEEP_DIR:-outputs/sweep_mask}" -- "$@" ;;
  *) sed -n '2,10p' "$0"; exit 1 ;;
esac
