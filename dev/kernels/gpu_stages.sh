# Maintainers' kernel stages of tools/gpu_check.sh (KERNEL_STAGES=1): the A/B of prepared
# versions of csrc/ (dev/kernels/kernel_ab.py), Nsight Compute's view of the fused loss's
# kernels (summarised by dev/kernels/ncu_stalls.py), the layout comparison and the slice
# kernels' images-per-warp sweep. Sourced by gpu_check.sh, which provides run_stage, log,
# $OUT, $LOG and LOSS_ARGS; it calls the two functions below.
#
#   PROFILE=0 SLICE_IMAGES=1,2,4,8 NCU=1 TESTS_K=fused KERNEL_STAGES=1 bash tools/gpu_check.sh
#       # the loss kernels only: no step profile, the slice kernels' images per warp swept,
#       # and Nsight Compute's view of one forward and one backward launch (ncu.txt: the
#       # sections, then why the warps wait: stall reasons, pipe use, and the SASS
#       # instructions that drew the most stall samples, by dev/kernels/ncu_stalls.py; the first part took
#       # 15 s on an H100, the second has not yet run on a GPU)
#   AB=1 PROFILE=0 KERNEL_STAGES=1 bash tools/gpu_check.sh
#       # also times the versions of csrc/ that `python dev/kernels/kernel_ab.py prepare ...` put
#       # in .ab/ (carry it: the device tool's carry [".ab"]) against each other: about 90 s
#       # to build two at once, then 15 s a version and round (kernel_ab.json, kernel_ab.log;
#       # with PROFILE=1 and NCU=1 too, that makes the eight files that can come back);
#       # AB_SECONDS (default 240) bounds the stage: give more versions more
#   AB=1 AB_ADOPT=1 PROFILE=0 AB_SECONDS=300 BUDGET=540 KERNEL_STAGES=1 bash tools/gpu_check.sh
#       # times the prepared versions first, then builds, tests and benchmarks the fastest in
#       # place of the tree's csrc/ (if it beats the first version, the baseline, by more than
#       # AB_MARGIN of its forward + backward time), all in one call: a second machine start is
#       # minutes of a session's device time. The log and the loss JSON's commit name the csrc/
#       # that was checked (the prepared version's commit, with its patch)

SLICE_IMAGES=${SLICE_IMAGES:-}
NCU=${NCU:-0}
AB=${AB:-0}
AB_SECONDS=${AB_SECONDS:-240}  # the kernel_ab stage's limit: raise it for more than two versions
AB_ROUNDS=${AB_ROUNDS:-2}  # kernel_ab's rounds: each times every version once, in turn
AB_ADOPT=${AB_ADOPT:-0}
AB_MARGIN=${AB_MARGIN:-0.02}  # how much faster (a fraction of the baseline's time) a version must be to be adopted
# The three CUDA layouts side by side in the loss benchmark.
LOSS_IMPLS=${LOSS_IMPLS/%fused/fused,fused_warp,fused_blocked}
[[ -n $SLICE_IMAGES ]] && LOSS_ARGS+=(--slice-images "$SLICE_IMAGES")

# kernel_ab imports carp_fast, which the first of its stages runs before the tree's build.
KERNEL_AB=(env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python dev/kernels/kernel_ab.py)

kernel_stages_before_build() {
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
}

kernel_stages_after_loss() {
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
    # (SourceCounters), summarised by dev/kernels/ncu_stalls.py; all appended to ncu.txt.
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
      { echo "== ncu: stall samples per SASS instruction (dev/kernels/ncu_stalls.py)"; python dev/kernels/ncu_stalls.py "$NCU_REPORT.csv"; } \
        >> "$OUT/ncu.txt" 2>&1
    fi
  fi
  if ((AB && !AB_ADOPT)); then
    run_stage "kernel_ab: the prepared versions of csrc/ in .ab/" "$AB_SECONDS" \
      "${KERNEL_AB[@]}" run --rounds "$AB_ROUNDS" --out "$OUT"
  fi
}
