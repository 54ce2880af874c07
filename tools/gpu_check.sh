#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch with CUDA, no DALI, no FFCV,
# no internet). Within about 6 minutes it builds the extension, runs the GPU tests, times
# the loss kernels and profiles a production-shape step with and without the published
# baseline. Everything it measures lands in $OUT (or ./gpu_check_out) as JSON and logs,
# ready to be committed under benchmarks/.
#
#   bash tools/gpu_check.sh            # on the GPU machine, from the repository root
#   BATCH=192 bash tools/gpu_check.sh  # force the per-GPU batch
#   COMPILE=1 bash tools/gpu_check.sh  # also measure torch.compile of the backbone (slower)
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/gpu_check.log"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu_check.log"
python - <<'PY' | tee -a "$OUT/gpu_check.log"
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY

log "build (sm_90 only, to save time)"
export CARP_FAST_CUDA_ARCH=${CARP_FAST_CUDA_ARCH:-9.0}
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; log "build failed"; exit 1; }
python -c "from carp_fast import fused_loss as f; print('fused available:', f.is_available(), f.unavailable_reason() if not f.is_available() else '')" \
  | tee -a "$OUT/gpu_check.log"

log "GPU tests"
timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"

log "loss kernels at B=256, bf16"
timeout 90 python tools/bench_loss.py --device cuda --dtype bf16 --batch 256 --reps 20 \
  --json "$OUT/loss_cuda_bf16.json" 2>&1 | tail -15 | tee -a "$OUT/gpu_check.log"

PROFILE_ARGS=(--cfg fast_400ep.yaml --device cuda --backends synthetic --steps 15 --warmup 5
  train.amp=bf16 model.channels_last=true)
pick_batch() {
  for batch in ${BATCH:-256 224 192 160 128}; do
    if timeout 120 python tools/profile_throughput.py "${PROFILE_ARGS[@]}" --steps 2 --warmup 1 \
        --loss-reps 1 data.batch_size=$batch > "$OUT/probe_$batch.log" 2>&1; then
      echo "$batch"; return 0
    fi
    grep -q "out of memory" "$OUT/probe_$batch.log" || { tail -20 "$OUT/probe_$batch.log" >&2; }
  done
  return 1
}
log "largest per-GPU batch that fits"
BATCH_FOUND=$(pick_batch) || { log "no batch size fits"; exit 1; }
log "batch $BATCH_FOUND"

log "profile: carp_fast vs published baseline (compute on identical synthetic inputs)"
timeout 200 python tools/profile_throughput.py "${PROFILE_ARGS[@]}" data.batch_size=$BATCH_FOUND \
  --baseline ${COMPILE:+--compile} --json "$OUT/profile_gpu_bs${BATCH_FOUND}.json" 2>&1 | tail -30 | tee -a "$OUT/gpu_check.log"

log "done"
