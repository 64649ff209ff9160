#!/usr/bin/env bash
# Issue #12: IWEM's one-pass step on the CPU-budget static MNIST table of docs/results.md
# (10 000 training images, 15 epochs, α +0.1 per epoch, K = J = 50, seeds 1-3), scored as that
# table is: K = 1 000 on the whole test set. Resumable (run it again after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/cpu-budget}
for seed in 1 2 3; do
    run="$out/static-mnist-mlp-iwem-one-pass-K50-J50-s$seed"
    .venv/bin/python -m pyro_iwem train --dataset static-mnist --model mlp --method iwem-one-pass --K 50 --J 50 \
        --epochs 15 --anneal-increment 0.1 --max-train 10000 --max-eval 2000 --eval-K 5000 --threads 1 \
        --seed "$seed" --out "$run" --resume --quiet
    .venv/bin/python -m pyro_iwem evaluate "$run" --K 1000 --all-test
done
