#!/usr/bin/env bash
# One GPU check, in one piece (target: under 5 minutes on one H100 or H200). Every result line is
# JSON; MFU comes both ways in each: `mfu` against a bf16 matmul measured in the same process,
# `mfu_nominal` against the datasheet's dense bf16 peak of the detected GPU. In order (eager first,
# the slow-to-compile runs last):
#   1. DiT-XL/2 training, bf16, eager, without and with activation checkpointing;
#   1b. the step with REPA (DINOv2-B teacher with random weights of its size: nothing downloads)
#      and the encoder's share of it;
#   2. sampling with guidance (scale 1.5, halves in one batch of 2N), bf16, eager: DDPM-250, Euler-50,
#      and the few-step solvers DPM-Solver++(2M)-20 and UniPC-20 (flow); each with FID-50K hours;
#   3. the largest training batch that fits, without and with checkpointing;
#   4. compiled (compile_blocks): training bf16, without and with checkpointing; training FP8
#      (module.fp8, torchao rowwise) from the same seed, so its `losses` compare with the bf16 run's;
#      the profile of one compiled step (top kernels and shares); sampling DDPM-250 and Euler-50 in
#      bf16, compiled (the evaluate.py precision=bf16-mixed compile=true path).
# Save the output in benchmarks/results/ and the numbers in benchmarks/README.md:
#   bash benchmarks/gpu_check.sh | tee benchmarks/results/<gpu>_<date>_gpu_check.jsonl
#   bash benchmarks/gpu_check.sh --dry-run  # the same steps on a tiny model on CPU (tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's interpreter (make install's .venv) unless PY says otherwise.
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi

if [[ "${1:-}" == "--dry-run" ]]; then
  TRAIN="model=dit_s depth=1 latent_size=8 batch_size=2 steps=1 warmup=1 device=cpu peak_matmul=256"
  MAXB="model=dit_s depth=1 latent_size=8 start=2 limit=4 device=cpu"
  PROFILE="model=dit_s depth=1 latent_size=8 batch_size=2 steps=1 warmup=1 top=5 device=cpu"
  # A small matmul for the peak: CPUs without bf16 units (AVX2) emulate bf16 at ~1 GFLOP/s.
  SAMPLE="tiny=true num_samples=2 steps=3 repeats=1 device=cpu peak_matmul=256"
  REPA="alignment=repa alignment_depth=1 encoder=dinov2_s"
  COMPILE=false  # a CPU compile of even a tiny model takes minutes: the compiled runs are skipped
else
  TRAIN="model=dit_xl batch_size=128 steps=10 warmup=3"
  MAXB="model=dit_xl start=64 limit=2048"
  PROFILE="model=dit_xl batch_size=128 steps=2 warmup=3 top=15"
  SAMPLE="model=dit_xl num_samples=32 repeats=1"  # guided: batches of 64
  REPA="alignment=repa alignment_depth=8 encoder=dinov2_b"  # REPA's SiT-XL/2 setting
  COMPILE=true
fi
json() { grep '^{' || true; }

for ckpt in false true; do
  $PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=false grad_checkpointing=$ckpt | json
done
$PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=false $REPA | json
# Each sampler at its default steps (ddpm 250, euler 50, dpmpp_2m 20, unipc_flow 20) unless the
# dry run's steps= shortens them all.
$PY benchmarks/sample.py $SAMPLE samplers=ddpm,euler,dpmpp_2m,unipc_flow cfg_scale=1.5 \
  precision=bf16-mixed | json
for ckpt in false true; do
  $PY benchmarks/max_batch.py $MAXB precision=bf16-mixed grad_checkpointing=$ckpt | json
done
# FP8 runs only on FP8 GPUs with torchao and compile; elsewhere its clear error becomes one JSON line.
fp8_log=$(mktemp)
if $PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=$COMPILE fp8=true \
  > "$fp8_log" 2>&1; then
  json < "$fp8_log"
else
  reason=$(grep -v '^\s*$' "$fp8_log" | tail -n 1 | sed 's/\\/\\\\/g; s/"/\\"/g')
  echo "{\"skipped\": \"fp8\", \"reason\": \"$reason\"}"
fi
rm -f "$fp8_log"
if [[ $COMPILE == true ]]; then
  for ckpt in false true; do
    $PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=true grad_checkpointing=$ckpt | json
  done
  $PY benchmarks/sample.py $SAMPLE samplers=ddpm,euler cfg_scale=1.5 precision=bf16-mixed \
    compile=true | json
fi
$PY benchmarks/profile_step.py $PROFILE precision=bf16-mixed compile=$COMPILE | json
