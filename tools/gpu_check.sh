#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch with CUDA, no DALI, no FFCV,
# no internet). It builds the extension, runs the GPU tests, times the loss kernels against
# the memory roofline and profiles a production-shape step (ResNet-50, 2x224 + 6x96,
# K = 65,536, P = 512, bf16, channels-last, the largest per-GPU batch that fits) with and
# without the published baseline: about 4.6 minutes on an H200 (its log is at commit 0bd6d15, docs/kernel_history.md).
# COMPILE=1 also measures torch.compile of the backbone, both ways, in the same profile
# (about 2 minutes more, most of it compiling). Stages stop starting after BUDGET seconds.
# Everything lands in $OUT (or ./gpu_check_out) as at most eight files (JSON and logs),
# ready to be committed under benchmarks/.
#
#   bash tools/gpu_check.sh                 # on the GPU machine, from the repository root
#   COMPILE=1 BUDGET=540 bash tools/gpu_check.sh
#   BATCHES=256 bash tools/gpu_check.sh     # per-GPU batch sizes to try, largest first
#   TESTS_K=knn LOSS_IMPLS=published,fused bash tools/gpu_check.sh   # a shorter rerun
#   CARP_FAST_COMMIT=<sha> ...              # the commit to record where .git did not travel
#       # (give the sha itself: $(git rev-parse HEAD) run on such a machine reads its stale .git)
#   KERNEL_STAGES=1 ... bash tools/gpu_check.sh
#       # maintainers: also the kernel A/B, Nsight Compute and tuning stages of
#       # dev/kernels/gpu_stages.sh (see dev/kernels/README.md)
set -uo pipefail
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-360}
BATCHES=${BATCHES:-640,512,384,256,128}
TESTS_K=${TESTS_K:-}  # a pytest -k filter for the GPU tests (all of them by default)
LOSS_IMPLS=${LOSS_IMPLS:-published,reference,compiled,fused}
COMPILE=${COMPILE:-0}
PROFILE=${PROFILE:-1}
KERNEL_STAGES=${KERNEL_STAGES:-0}
NVJPEG=${NVJPEG:-1}  # the nvjpeg stage (0: leave it out)
LOSS_ARGS=()  # further tools/bench_loss.py arguments (the kernel stages add some)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "== $(date +%H:%M:%S) (+$(($(date +%s) - START)) s) $*" | tee -a "$LOG"; }
# run_stage NAME MAX_SECONDS CMD...: the command under a timeout that respects the budget.
run_stage() {
  local name=$1 most=$2
  shift 2
  local limit
  limit=$(left)
  limit=$((limit < most ? limit : most))
  if ((limit < 20)); then
    log "$name: skipped, $(left) s of the budget left"
    return 99
  fi
  log "$name (at most $limit s)"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  log "$name: exit $status"
  return "$status"
}

log "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$LOG"
python - <<'PY' 2>&1 | tee -a "$LOG"
import torch
from carp_fast.profiling import git_commit
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("commit", git_commit(), "(CARP_FAST_COMMIT names it where the tree came without its history)")
PY

# Only the GPU in hand: sm_90 for H100/H200 (CARP_FAST_CUDA_ARCH overrides).
export CARP_FAST_CUDA_ARCH=${CARP_FAST_CUDA_ARCH:-$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Maintainers' kernel stages: they define kernel_stages_before_build / _after_loss.
if ((KERNEL_STAGES)); then
  source dev/kernels/gpu_stages.sh
  kernel_stages_before_build
fi

log "build for sm_${CARP_FAST_CUDA_ARCH/./}"
if ! timeout 240 python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log" | tee -a "$LOG"
  log "build failed"
  exit 1
fi
python -c "from carp_fast import fused_loss as f; print('fused CUDA kernels:', f.supports_device('cuda'), f.unavailable_reason())" 2>&1 | tee -a "$LOG"

# GPU tests. If they fail, the blocked kernels are tested alone (a fault in one kernel
# poisons the CUDA context for every later test in that process) and, if they pass, the rest
# of the run uses them.
TESTS=(python -m pytest -q -m cuda -p no:cacheprovider tests ${TESTS_K:+-k "$TESTS_K"})
run_stage "GPU tests${TESTS_K:+ (-k '$TESTS_K')}" 150 "${TESTS[@]}" > "$OUT/gpu_tests.log"
tests_status=$?
tail -30 "$OUT/gpu_tests.log"
if ((tests_status != 0 && tests_status != 99)); then
  CARP_FAST_CUDA_KERNELS=blocked run_stage "GPU tests, blocked kernels only" 120 \
    python -m pytest -q -m cuda -p no:cacheprovider tests \
    -k "not auto and not kernels_agree" >> "$OUT/gpu_tests.log"
  if (($? == 0)); then
    export CARP_FAST_CUDA_KERNELS=blocked
    log "the rest of the run uses CARP_FAST_CUDA_KERNELS=blocked"
  fi
fi

# Training from JPEG files on this GPU (the nvjpeg backend against torchvision's, next to the
# synthetic step): the figure no GPU run had, so it comes before the loss and step profiles.
((NVJPEG)) && run_stage "nvjpeg: the first epoch from JPEG files (tools/gpu_check_nvjpeg.py)" 240 \
  python tools/gpu_check_nvjpeg.py --budget 200 --json "$OUT/gpu_check_nvjpeg.json"

run_stage "loss at B=256, bf16: $LOSS_IMPLS" 120 \
  python tools/bench_loss.py --device cuda --dtype bf16 --batch 256 --reps 20 \
  --impls "$LOSS_IMPLS" "${LOSS_ARGS[@]}" --json "$OUT/loss_cuda_bf16.json"

((KERNEL_STAGES)) && kernel_stages_after_loss

# No loader here (no DALI, FFCV or ImageNet on the machine): compute on synthetic batches
# against the published recipe on the same inputs; eager unless COMPILE=1 (then both ways).
COMPILE_ARGS=(train.compile=false)
((COMPILE)) && COMPILE_ARGS=(--compile)
((PROFILE)) && run_stage "profile: carp_fast vs the published baseline" 300 \
  python tools/profile_throughput.py --cfg fast_400ep.yaml --device cuda --backends "" \
  --steps 15 --warmup 5 --loss-reps 10 --loss-impls reference,fused --fit-batch "$BATCHES" \
  --baseline "${COMPILE_ARGS[@]}" train.amp=bf16 \
  --json "$OUT/profile_gpu.json"

log "summary"
OUT="$OUT" python - <<'PY' 2>&1 | tee -a "$LOG"
import json, os, re
from pathlib import Path
out = Path(os.environ["OUT"])
tests = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else ""
print("tests:", "; ".join(re.findall(r"^=* ?(\d+ (?:passed|failed).*?) ?=*$", tests, re.M)) or "no result")
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
loss = load("loss_cuda_bf16.json")
if loss:
    print("loss ms:", {k: round(v, 3) for k, v in loss["median_ms"].items()})
    print("ratios:", {k: round(v, 2) for k, v in loss["ratios"].items() if "time" in k})
    for impl, kernels in (loss.get("roofline") or {}).get("kernels", {}).items():
        fb = kernels["forward_backward"]
        print(f"roofline {impl}: {fb['median_ms']:.3f} ms, {fb['of_copy_bandwidth']:.0%} of copy,",
              f"{fb['of_datasheet_peak']:.0%} of datasheet" if fb["of_datasheet_peak"] else "")
nvjpeg = load("gpu_check_nvjpeg.json")
if nvjpeg:
    print("nvjpeg:", nvjpeg["verdict"]["text"])
prof = load("profile_gpu.json")
if prof:
    line = f"profile: batch {prof['shape']['batch_per_process']}, compute {prof['compute']['images_per_s']:.0f} img/s"
    if "baseline" in prof:
        line += f", baseline {prof['baseline']['images_per_s']:.0f} img/s, speed-up {prof['speedup_over_baseline']:.2f}x"
    if "compute_compiled" in prof:
        line += f", compiled {prof['compute_compiled'].get('images_per_s', prof['compute_compiled'].get('error'))}"
        line += f", compiled speed-up {prof.get('speedup_over_baseline_compiled')}"
    print(line)
PY
log "done"
