#!/usr/bin/env bash
# Issue #10, part 4: the paper's full protocol on Caltech 101 Silhouettes (MLP, K = J = 50,
# Adam 5e-4, batch 100, α +0.01 per epoch, up to 1 500 epochs, early stopping after 50 epochs
# without validation gain at α = 1, test IWAE bound with K = 5 000 on the whole test set),
# IWAE and IWEM with seeds 1-3, on Ray: one CPU (one thread) per run, as many runs at once as
# the machine has cores. Resumable: run it again after an interruption; finished runs are
# skipped, interrupted ones continue from their checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-../runs/caltech101}  # outside the work tree, which a new session lays anew
methods=${METHODS:-iwae,iwem}   # issue #12's converged check of the one-pass step: METHODS=iwem-one-pass
.venv/bin/python -m pyro_iwem sweep --methods "$methods" --datasets caltech101 --models mlp \
    --seeds 1,2,3 --K 50 --J 50 --cpus-per-run 1 --interval 600 --out "$out"
