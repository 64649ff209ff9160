"""docs/results-one-pass-ablation.png: the CPU-budget static MNIST test log-likelihoods (whole
test set, K = 1 000) of the one-pass ablation (docs/results.md), one dot per seed where the
runs' metrics.json are in docs/results, mean ± sd bars for every method."""

import json
import pathlib
import statistics

from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
#: where the runs of the one-pass step and of the ablation keep their metrics.json
RUN_DIRS = ("static-mnist-cpu-budget", "static-mnist-one-pass-ablation")
KEY = "test_ll_all_K1000"
#: Table 1's rows (docs/results.md), whose runs are not in docs/results: (mean, sd, seeds)
TABLE_1 = {"iwae": (-109.08, 0.07, 3), "iwem": (-109.35, 0.16, 3), "iwem-woa": (-109.02, 0.28, 3)}
#: (label, the P-step, the ELBO term while α < 1): top to bottom
ROWS = [
    ("iwae", "", ""),
    ("iwem", "θ_{t+1}, J fresh", "L = 1"),
    ("iwem-woa", "θ_{t+1}, J fresh", "none (α ≡ 1)"),
    ("iwem-one-pass-woa", "θ_t, E-step's", "none (α ≡ 1)"),
    ("iwem-L50", "θ_{t+1}, J fresh", "L = 50"),
    ("iwem-one-pass", "θ_t, E-step's", "its K = 50"),
]


def seeds(method):
    runs = [p for d in RUN_DIRS for p in sorted((RESULTS / d).glob(f"static-mnist-mlp-{method}-K50-J50-s*/metrics.json"))]
    return [json.loads(p.read_text())[KEY] for p in runs]


def main():
    fig = Figure(figsize=(7.5, 3.4))
    ax = fig.add_subplot()
    labels = []
    for y, (method, p_step, elbo) in enumerate(reversed(ROWS)):
        values = seeds(method)
        if values:
            mean, sd = statistics.mean(values), statistics.stdev(values)
            ax.plot(values, [y] * len(values), "o", color="tab:blue", alpha=0.6, ms=5)
        else:
            mean, sd, _ = TABLE_1[method]
        ax.errorbar(mean, y, xerr=sd, fmt="|", color="black", ms=14, capsize=4)
        labels.append(f"{method}" + (f"\nP-step {p_step}; ELBO {elbo}" if p_step else ""))
    ax.set_yticks(range(len(ROWS)), labels, fontsize=7)
    ax.set_xlabel("test log-likelihood, whole test set, K = 1 000 (nats)")
    ax.set_title("static MNIST, CPU budget (10 000 images, 15 epochs): what the one-pass step's gain comes from",
                 fontsize=8)
    ax.xaxis.set_major_locator(MultipleLocator(0.5))
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = ROOT / "docs" / "results-one-pass-ablation.png"
    fig.savefig(out, dpi=130)
    print(out)


if __name__ == "__main__":
    main()
