"""The time per epoch of one ``pyro-iwem train`` run on one and on two processes (issue 22).

    python benchmarks/train_processes.py                          # static MNIST, 2 000 images, IWEM K = J = 50
    python benchmarks/train_processes.py --repeats 3 --out benchmarks/results/train_processes_cpu.json

Each configuration is the same run (same seed, data, batches and options), launched as a user
would: ``python -m pyro_iwem train ...``, and under ``torchrun --standalone --nproc_per_node 2``
for two processes (docs/scaling.md). The configurations are interleaved, ``--repeats`` times,
so that other load slows them alike; each run's ``seconds_per_epoch`` (training steps and the
validation bound, from its metrics.json) is reported, and the median of each configuration with
its ratio to one process at one thread. ``--threads`` is per process: on a 2-core machine two
processes at one thread each use the cores that one process at two threads uses.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from pyro_iwem.experiments.sweep import pyro_iwem_command  # noqa: E402

#: (label, processes, threads per process)
CONFIGS = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1))


def time_run(processes, threads, train_args, out):
    argv = ["train", *train_args, "--threads", str(threads), "--quiet", "--out", str(out)]
    subprocess.run(pyro_iwem_command(argv, processes), check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="static-mnist")
    parser.add_argument("--method", default="iwem")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--K", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the runs' figures here as JSON")
    args = parser.parse_args()
    train_args = ["--dataset", args.dataset, "--method", args.method, "--K", str(args.K), "--J", str(args.K),
                  "--max-train", str(args.max_train), "--epochs", str(args.epochs), "--max-eval", "200",
                  "--valid-K", "10", "--eval-K", "50", "--device", args.device]  # fmt: skip
    runs = {label: [] for label, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for label, processes, threads in CONFIGS:
                m = time_run(processes, threads, train_args, pathlib.Path(tmp) / f"{processes}-{threads}-{repeat}")
                runs[label].append({"seconds_per_epoch": m["seconds_per_epoch"], "test_ll": m["test_ll"],
                                    "world_size": m["world_size"]})  # fmt: skip
                print(f"{label}: {m['seconds_per_epoch']:.2f} s/epoch, test LL {m['test_ll']:.2f}", flush=True)
    base = statistics.median(r["seconds_per_epoch"] for r in runs[CONFIGS[0][0]])
    print(f"\n{args.dataset}, {args.method}, K = J = {args.K}, {args.max_train} images, {args.device}; median of "
          f"{args.repeats}\n| configuration | s/epoch | ratio to 1 process, 1 thread |\n|---|---:|---:|")  # fmt: skip
    for label, found in runs.items():
        median = statistics.median(r["seconds_per_epoch"] for r in found)
        print(f"| {label} | {median:.2f} | {median / base:.2f} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
