#!/usr/bin/env bash
# One prepared run for a lent GPU machine (Python 3.12, torch with CUDA, no DALI, no FFCV,
# no internet). It builds the extension, runs the GPU tests, times the loss kernels against
# the memory roofline and profiles a production-shape step (ResNet-50, 2x224 + 6x96,
# K = 65,536, P = 512, bf16, channels-last, the largest per-GPU batch that fits) with and
# without the published baseline: about 4.6 minutes on an H200 (benchmarks/gpu_check_h200_run1.log).
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
#   PROFILE=0 SLICE_IMAGES=1,2,4,8 NCU=1 TESTS_K=fused bash tools/gpu_check.sh
#       # the loss kernels only: no step profile, the slice kernels' images per warp swept,
#       # and Nsight Compute's view of one forward and one backward launch (ncu.txt: the
#       # sections, then why the warps wait: stall reasons, pipe use, and the SASS
#       # instructions that drew the most stall samples, by tools/ncu_stalls.py; the first part took
#       # 15 s on an H100, the second has not yet run on a GPU)
#   AB=1 PROFILE=0 bash tools/gpu_check.sh
#       # also times the versions of csrc/ that `python tools/kernel_ab.py prepare ...` put
#       # in .ab/ (carry it: the device tool's carry [".ab"]) against each other: about 90 s
#       # to build two at once, then 15 s a version and round (kernel_ab.json, kernel_ab.log;
#       # with PROFILE=1 and NCU=1 too, that makes the eight files that can come back);
#       # AB_SECONDS (default 240) bounds the stage: give more versions more
#   AB=1 AB_ADOPT=1 PROFILE=0 AB_SECONDS=300 BUDGET=540 bash tools/gpu_check.sh
#       # times the prepared versions first, then builds, tests and benchmarks the fastest in
#       # place of the tree's csrc/ (if it beats the first version, the baseline, by more than
#       # AB_MARGIN of its forward + backward time), all in one call: a second machine start is
#       # minutes of a session's device time. The log and the loss JSON's commit name the csrc/
#       # that was checked (the prepared version's commit, with its patch)
set -uo pipefail
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-360}
BATCHES=${BATCHES:-640,512,384,256,128}
TESTS_K=${TESTS_K:-}  # a pytest -k filter for the GPU tests (all of them by default)
LOSS_IMPLS=${LOSS_IMPLS:-published,reference,compiled,fused,fused_warp,fused_blocked}
COMPILE=${COMPILE:-0}
PROFILE=${PROFILE:-1}
SLICE_IMAGES=${SLICE_IMAGES:-}
NCU=${NCU:-0}
AB=${AB:-0}
AB_SECONDS=${AB_SECONDS:-240}  # the kernel_ab stage's limit: raise it for more than two versions
AB_ROUNDS=${AB_ROUNDS:-2}  # kernel_ab's rounds: each times every version once, in turn
AB_ADOPT=${AB_ADOPT:-0}
AB_MARGIN=${AB_MARGIN:-0.02}  # how much faster (a fraction of the baseline's time) a version must be to be adopted
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

# kernel_ab imports carp_fast, which the first of its stages runs before the tree's build.
KERNEL_AB=(env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python tools/kernel_ab.py)
if ((AB && AB_ADOPT)); then
  run_stage "kernel_ab: the prepared versions of csrc/ in .ab/, before the tree's build" "$AB_SECONDS" \
    "${KERNEL_AB[@]}" run --rounds "$AB_ROUNDS" --out "$OUT"
  # The fastest version that ran replaces csrc/ for every stage after this one.
  adopted=$("${KERNEL_AB[@]}" adopt --result "$OUT/kernel_ab.json" --margin "$AB_MARGIN" 2>&1 \
    | tee -a "$LOG" | tail -1)
  if [[ $adopted == adopted* ]]; then
    export CARP_FAST_COMMIT=${adopted##*: }
    log "csrc/ is now ${adopted#adopted }"
  else
    log "$adopted"
  fi
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

run_stage "loss at B=256, bf16: $LOSS_IMPLS" 120 \
  python tools/bench_loss.py --device cuda --dtype bf16 --batch 256 --reps 20 \
  --impls "$LOSS_IMPLS" --slice-images "$SLICE_IMAGES" --json "$OUT/loss_cuda_bf16.json"

if ((NCU)); then
  # --clock-control none: the card's clocks stay as found (ncu's default locks them to base
  # while it profiles, which this workplace's machines forbid; runs before 2026-11-28 did it).
  NCU_ARGS=(ncu --clock-control none --launch-count 2 -k "regex:(forward|backward)_(slice_|warp_)?kernel")
  NCU_BENCH=(python tools/bench_loss.py --device cuda --dtype bf16 --batch 256 --reps 1 --warmup 1 --impls fused)
  run_stage "ncu: the first forward and backward kernel launches of the fused loss" 120 \
    "${NCU_ARGS[@]}" --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats \
    "${NCU_BENCH[@]}" > "$OUT/ncu.txt"
  # Why the warps wait, as a second pass so that a metric this ncu lacks costs only this part:
  # the stall reasons and pipe use of the whole kernel, then PC sampling per SASS instruction
  # (SourceCounters), summarised by tools/ncu_stalls.py; all appended to ncu.txt.
  STALL_METRICS=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' \
    barrier branch_resolving dispatch_stall drain imc_miss lg_throttle long_scoreboard \
    math_pipe_throttle membar mio_throttle misc no_instruction not_selected selected \
    short_scoreboard sleeping tex_throttle wait)
  PIPE_METRICS=$(printf 'sm__inst_executed_pipe_%s.avg.pct_of_peak_sustained_active,' alu fma xu lsu adu cbu uniform)
  NCU_REPORT=${TMPDIR:-/tmp}/carp_fast_ncu_stalls
  rm -f "$NCU_REPORT.ncu-rep" "$NCU_REPORT.csv"
  run_stage "ncu: stall reasons, pipe use and stall samples per SASS instruction" 150 \
    "${NCU_ARGS[@]}" --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters \
    --metrics "${STALL_METRICS}${PIPE_METRICS%,}" --export "$NCU_REPORT" --force-overwrite \
    "${NCU_BENCH[@]}" > /dev/null
  if [[ -f $NCU_REPORT.ncu-rep ]]; then
    { echo "== ncu: stall reasons and pipe use"; ncu --import "$NCU_REPORT.ncu-rep"; } >> "$OUT/ncu.txt" 2>&1
    ncu --import "$NCU_REPORT.ncu-rep" --page source --csv --print-source sass > "$NCU_REPORT.csv" 2>> "$LOG"
    { echo "== ncu: stall samples per SASS instruction (tools/ncu_stalls.py)"; python tools/ncu_stalls.py "$NCU_REPORT.csv"; } \
      >> "$OUT/ncu.txt" 2>&1
  fi
fi

if ((AB && !AB_ADOPT)); then
  run_stage "kernel_ab: the prepared versions of csrc/ in .ab/" "$AB_SECONDS" \
    "${KERNEL_AB[@]}" run --rounds "$AB_ROUNDS" --out "$OUT"
fi

# No loader here (no DALI, FFCV or ImageNet on the machine): compute on synthetic batches
# against the published recipe on the same inputs; eager unless COMPILE=1 (then both ways).
COMPILE_ARGS=(train.compile=false)
((COMPILE)) && COMPILE_ARGS=(--compile)
((PROFILE)) && run_stage "profile: carp_fast vs the published baseline" 300 \
  python tools/profile_throughput.py --cfg fast_400ep.yaml --device cuda --backends "" \
  --steps 15 --warmup 5 --loss-reps 10 --loss-impls reference,fused --fit-batch "$BATCHES" \
  --baseline "${COMPILE_ARGS[@]}" train.amp=bf16 model.channels_last=true \
  --json "$OUT/profile_gpu.json"

run_stage "nvjpeg: the first epoch from JPEG files (tools/gpu_check_nvjpeg.py)" 360 python tools/gpu_check_nvjpeg.py --json "$OUT/gpu_check_nvjpeg.json"
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
