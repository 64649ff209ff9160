#!/usr/bin/env bash
# Issue #10, part 3: Figure 4 at a CPU budget: the variance of miss-IWEM's E-step estimate (eq. 9,
# alpha = 1) at each run's best parameters, as the number of missing 3x3 patches grows. The budget
# of the Figure 1-2 runs in docs/results.md: static MNIST, the paper's MLP, K = J = 50, the first
# 2 000 training images, 6 epochs, alpha + 0.2 per epoch, one thread, seed 1. Resumable (finished
# runs are skipped, interrupted ones resume); about 2-3 minutes per run on an idle core.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-../runs/figure4}
for n in 1 3 4 5 6; do
    run=$out/static-mnist-mlp-miss-iwem-p$n-s1
    [ -f "$run/metrics.json" ] && continue
    .venv/bin/python -m pyro_iwem train --dataset static-mnist --model mlp --method miss-iwem --K 50 --J 50 \
        --missing-patches $n --epochs 6 --anneal-increment 0.2 --max-train 2000 --max-eval 1000 --eval-K 1000 \
        --threads 1 --seed 1 --quiet --out "$run" --resume
done
.venv/bin/python -m pyro_iwem figures "$out" --figures 4 --num-data 100 --repeats 100 --threads 1 --out "$out/figures"
