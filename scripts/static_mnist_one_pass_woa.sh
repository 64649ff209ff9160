#!/usr/bin/env bash
# Issue #12: which part of the one-pass step buys its 1.6 nats over the paper's IWEM step on the
# CPU-budget static MNIST table? The one-pass step with α = 1 from the start (--anneal-start 1)
# has no annealed ELBO term, so set beside iwem-woa (the paper's step at α = 1, Table 1) it
# isolates the P-step on the E-step's particles at θ_t. Same protocol as
# scripts/static_mnist_one_pass.sh (10 000 training images, 15 epochs, K = J = 50, seeds 1-3,
# scored with K = 1 000 on the whole test set). Resumable; JOBS runs at once (default 2, one
# thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/cpu-budget}
jobs=${JOBS:-2}
one() {
    local seed=$1 run="$out/static-mnist-mlp-iwem-one-pass-woa-K50-J50-s$1"
    .venv/bin/python -m pyro_iwem train --dataset static-mnist --model mlp --method iwem-one-pass --anneal-start 1 \
        --K 50 --J 50 --epochs 15 --max-train 10000 --max-eval 2000 --eval-K 5000 --threads 1 \
        --seed "$seed" --out "$run" --resume --quiet
    .venv/bin/python -m pyro_iwem evaluate "$run" --K 1000 --all-test --threads 1
}
export -f one
export out
printf '%s\n' 1 2 3 | xargs -P "$jobs" -I{} bash -c 'one {}'
