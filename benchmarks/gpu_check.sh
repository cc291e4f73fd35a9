#!/usr/bin/env bash
# One GPU check, under 5 minutes on one H100: DiT-XL/2 training images/s and MFU in bf16 with and
# without torch.compile and activation checkpointing, the largest batch that fits, and DDPM-250
# sampling images/s with guidance (plus a short run at a guided batch of 256), and the step with REPA
# (DINOv2-B teacher, random weights of its size: nothing downloads) and the encoder's share. Every result line is
# JSON; paste them into benchmarks/README.md. The eager runs come first, the slow-to-compile ones last.
#   bash benchmarks/gpu_check.sh            # on the GPU machine
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
  # A small matmul for the peak: CPUs without bf16 units (AVX2) emulate bf16 at ~1 GFLOP/s.
  SAMPLE="tiny=true num_samples=2 steps=3 repeats=1 device=cpu peak_matmul=256"
  SAMPLE_256="tiny=true num_samples=4 steps=2 repeats=1 device=cpu peak_matmul=256"
  REPA="alignment=repa alignment_depth=1 encoder=dinov2_s"
  COMPILE=false  # a CPU compile of even a tiny model takes minutes
else
  TRAIN="model=dit_xl batch_size=128 steps=10 warmup=3"
  MAXB="model=dit_xl start=64 limit=2048"
  SAMPLE="model=dit_xl num_samples=32 repeats=1"
  SAMPLE_256="model=dit_xl num_samples=128 steps=10 repeats=1"
  REPA="alignment=repa alignment_depth=8 encoder=dinov2_b"  # REPA's SiT-XL/2 setting
  COMPILE=true
fi

for ckpt in false true; do
  $PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=false grad_checkpointing=$ckpt | tail -n 1
done
$PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=false $REPA | tail -n 1
$PY benchmarks/sample.py $SAMPLE samplers=ddpm cfg_scale=1.5 precision=bf16-mixed | tail -n 1
$PY benchmarks/sample.py $SAMPLE_256 samplers=ddpm cfg_scale=1.5 precision=bf16-mixed | tail -n 1
for ckpt in false true; do
  $PY benchmarks/max_batch.py $MAXB precision=bf16-mixed grad_checkpointing=$ckpt
done
if [[ $COMPILE == true ]]; then
  for ckpt in false true; do
    $PY benchmarks/train_step.py $TRAIN precision=bf16-mixed compile=true grad_checkpointing=$ckpt | tail -n 1
  done
fi
