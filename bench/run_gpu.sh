#!/usr/bin/env bash
# Every benchmark of docs/PERFORMANCE.md on a CUDA machine, plus the same CPU measurements pinned
# to 2 cores (the development machine's size) so the CPU ratios are taken on a quiet machine.
#   bash bench/run_gpu.sh OUT_DIR
# Writes one JSON file per measurement into OUT_DIR (and all of them into OUT_DIR/all.txt). The
# training runs print samples/s, counted FLOPs per step and MFU (bench/bench_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF' > "$OUT/device.json"
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
EOF

run() {  # run NAME ARGS...: one measurement into OUT/NAME.json (errors kept in the file)
  local name=$1; shift
  "$@" > "$OUT/$name.json" 2>"$OUT/$name.err" || echo "{\"failed\": \"$name\"}" >> "$OUT/$name.json"
  { echo "== $name"; cat "$OUT/$name.json"; } >> "$OUT/all.txt"
}

# CPU, 2 pinned cores and 2 threads, in the background while the GPU runs its own (SKIP_CPU=1: not).
cpu_job=
if [ -z "${SKIP_CPU:-}" ]; then
  (run eval_cpu2 taskset -c 0,1 env OMP_NUM_THREADS=2 "$PY" -m bench.bench_eval --device cpu) &
  cpu_job=$!
fi

run eval_cuda_mid "$PY" -m bench.bench_eval --device cuda
for prec in fp32 bf16; do  # (bf16 was 8x slower than fp32 in the first H100 run: check it stays fixed)
  run eval_cuda_base384_$prec "$PY" -m bench.bench_eval --device cuda --width 768 --depth 12 --image_size 384 \
    --n_images 500 --n_texts 2500 --k_test 128 --rerank_batch_size 256 --precision $prec
done
for prec in fp32 bf16; do
  run train_cuda_mid_$prec "$PY" -m bench.bench_train --device cuda --precision $prec --batch 32
  run train_cuda_base384_$prec "$PY" -m bench.bench_train --device cuda --precision $prec --batch 32 \
    --width 768 --depth 12 --image_size 384
done
# ViT-B/16 @ 384 retrieval step with compile: true (samples/s, counted FLOPs, MFU, compile time)
for prec in fp32 bf16; do
  run train_cuda_base384_${prec}_compile "$PY" -m bench.bench_train --device cuda --precision $prec --batch 32 \
    --width 768 --depth 12 --image_size 384 --compile
done
run train_cuda_base384_bf16_ckpt "$PY" -m bench.bench_train --device cuda --precision bf16 --batch 32 \
  --width 768 --depth 12 --image_size 384 --grad_ckpt 12
for prec in fp32 bf16; do
  run vqa_cuda_mid_$prec "$PY" -m bench.bench_vqa --device cuda --size mid --precision $prec --out "$OUT/vqa_cuda_mid_$prec.full.json"
done
for prec in fp32 bf16; do
  run caption_cuda_base_$prec "$PY" -m bench.bench_caption --device cuda --size base --images 32 --precision $prec
done
[ -n "$cpu_job" ] && wait $cpu_job
cat "$OUT/all.txt"
