#!/usr/bin/env bash
# Issue #11: two CPU-budget Table 1 runs of docs/results.md (static MNIST, 10 000 training images,
# 15 epochs, alpha +0.1 per epoch; IWEM and one-pass IWEM, seed 1) swept through Ray, against the
# subprocess loop that `sweep` was before Ray (commit f91744c, checked out as a git worktree in
# $LOOP_TREE with the same virtual environment). Ray runs both at once with one CPU (one thread)
# each; the loop runs one after the other with torch's default threads (both cores). Compare the
# wall times, and the Ray runs' numbers with those of the same configurations (one thread each)
# in docs/results/static-mnist-cpu-budget*/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-../runs/ray-vs-loop}")
LOOP_TREE=${LOOP_TREE:-../runner}
budget=(--methods iwem,iwem-one-pass --datasets static-mnist --models mlp --seeds 1 --K 50 --J 50
        --epochs 15 --anneal-increment 0.1 --max-train 10000 --max-eval 2000 --eval-K 5000 --quiet)
start=$(date +%s)
.venv/bin/python -m pyro_iwem sweep "${budget[@]}" --cpus-per-run 1 --interval 120 --out "$out/ray"
echo "ray: $(( $(date +%s) - start )) s"
start=$(date +%s)
(cd "$LOOP_TREE" && .venv/bin/python -m pyro_iwem sweep "${budget[@]}" --out "$out/loop")
echo "loop: $(( $(date +%s) - start )) s"
