#!/usr/bin/env bash
# Issue #10, parts 4 and 5: for every finished run of scripts/caltech101_converged.sh, the official
# inflated score (proposal variance x 1.5, K = 5 000, whole test set; about 7 min at one thread) and
# the refit-encoder score (a fresh encoder fitted by IWAE to the frozen decoder for 10 000 steps,
# then the K = 5 000 bound; about an hour at one thread). Resumable: a score already in a run's
# metrics.json is skipped, and an interrupted refit continues from its last save (every 500 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-../runs/caltech101}
for metrics in "$out"/*/metrics.json; do
    run=$(dirname "$metrics")
    has() { grep -q "\"$1\"" "$metrics"; }
    has test_ll_inflated1.5_K5000 || .venv/bin/python -m pyro_iwem evaluate "$run" --K 5000 --score-inflation 1.5 --threads 1
    has test_ll_refit10000_K5000 || .venv/bin/python -m pyro_iwem evaluate "$run" --K 5000 --refit-encoder 10000 --threads 1
done
