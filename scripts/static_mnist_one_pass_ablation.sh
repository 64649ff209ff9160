#!/usr/bin/env bash
# Issue #12: which part of the one-pass step buys its 1.6 nats over the paper's IWEM step on the
# CPU-budget static MNIST table? It differs from the paper's step in two ways: its annealed ELBO
# term averages its K = 50 particles (the paper's draws L = 1 more), and its P-step runs at θ_t
# on the E-step's particles (the paper's at θ_{t+1} on J fresh ones). Two arms, three seeds each:
#   iwem-one-pass-woa  the one-pass step with α = 1 from the start (--anneal-start 1): no ELBO
#                      term, so beside iwem-woa (Table 1) only the P-step differs;
#   iwem-L50           the paper's step with its ELBO term over L = 50 particles (--L 50).
# Same protocol as scripts/static_mnist_one_pass.sh (10 000 training images, 15 epochs, α +0.1
# per epoch where there is annealing, K = J = 50, scored with K = 1 000 on the whole test set).
# Resumable (a recorded score is not recomputed); JOBS runs at once (default 2, one thread
# each); ARMS and SEEDS select (default both arms, seeds 1-3).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/cpu-budget}
jobs=${JOBS:-2}
arms=${ARMS:-iwem-one-pass-woa iwem-L50}
seeds=${SEEDS:-1 2 3}
one() {
    local arm=$1 seed=$2 options
    case $arm in
        iwem-one-pass-woa) options="--method iwem-one-pass --anneal-start 1" ;;
        iwem-L50) options="--method iwem --L 50 --anneal-increment 0.1" ;;
        *) echo "unknown arm $arm" >&2; return 2 ;;
    esac
    local run="$out/static-mnist-mlp-$arm-K50-J50-s$seed"
    # shellcheck disable=SC2086
    .venv/bin/python -m pyro_iwem train --dataset static-mnist --model mlp $options --K 50 --J 50 --epochs 15 \
        --max-train 10000 --max-eval 2000 --eval-K 5000 --threads 1 \
        --seed "$seed" --out "$run" --resume --quiet
    grep -q '"test_ll_all_K1000"' "$run/metrics.json" || .venv/bin/python -m pyro_iwem evaluate "$run" --K 1000 --all-test --threads 1
}
export -f one
export out
for seed in $seeds; do for arm in $arms; do echo "$arm $seed"; done; done | xargs -P "$jobs" -L 1 bash -c 'one "$0" "$1"'
