#!/usr/bin/env bash
# Issue #10, parts 4 and 5: for every finished run of scripts/caltech101_converged.sh, the official
# inflated score (proposal variance x 1.5, K = 5 000, whole test set; about 7 min at one thread) and
# the refit-encoder score (a fresh encoder fitted by IWAE to the frozen decoder for REFIT_STEPS
# steps, default 4 000, about 100 epochs of the 4 100 training images; then the K = 5 000 bound;
# about 25 minutes at one thread, 10 000 steps about an hour). Resumable: a score already in a run's
# metrics.json is skipped, and an interrupted refit continues from its last save (every 500 steps).
# usage: caltech101_scores.sh [RUN_DIR ...]  (default: every finished run; name disjoint sets of
# runs to score them in two processes at once, one per core)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-../runs/caltech101}
if [ $# -gt 0 ]; then runs=(); for run in "$@"; do runs+=("$run/metrics.json"); done
else runs=("$out"/*/metrics.json); fi
score() {  # score KEY ARGS...: every finished run without KEY in its metrics.json
    local key=$1; shift
    for metrics in "${runs[@]}"; do
        [ -f "$metrics" ] || continue
        grep -q "\"$key\"" "$metrics" || .venv/bin/python -m pyro_iwem evaluate "$(dirname "$metrics")" --K 5000 "$@" --threads 1
    done
}
score test_ll_inflated1.5_K5000 --score-inflation 1.5  # every inflated score first: minutes each
steps=${REFIT_STEPS:-4000}
score test_ll_refit${steps}_K5000 --refit-encoder "$steps"
