"""The variance of the E-step estimate during and after training: the paper's Figures 1, 2 and 4.

``figures RUN_DIR...``: Figure 1 from the runs' histories, which ``train --record-variance N``
recorded (:mod:`.variance`); Figure 2 (box plots over the data of the per-datum variances of
eqs. 2 and 3) and Figure 4 (miss-IWEM's variance against the number of missing patches) from
each run's ``best.pt``; each a PNG and a JSON of its numbers.
"""

import math
import pathlib
import statistics

import pyro
import torch

from pyro_iwem.infer import MISSING_DATA_INPUTS, VarianceEstimate

from .checkpoint import BEST, CHECKPOINT, atomic_write_json, torch_load
from .errors import RunError
from .setup import ALL_METHOD_ORDER, load_data, make_model, resolve_device
from .variance import subset_variances, variance_subset

#: Repeats of the variance when neither the command nor the run says (the paper's 100).
DEFAULT_REPEATS = 100
#: Training images of Figures 2 and 4 when neither the command nor the run says.
DEFAULT_NUM_DATA = 100
#: The figures ``figures`` can draw, by number.
FIGURES = (1, 2, 4)
#: What the boxes of Figure 2 show, by :class:`~pyro_iwem.infer.VarianceEstimate` field.
BOX_LABELS = {
    "q_hat": "(2) Q̂ = Σ w̄ log p",
    "joint": "(3) θ-part: mean log p",
    "elbo": "(3) ELBO: mean log p/q",
}
#: Output file names (without suffix) of the figures.
FIGURE_FILES = {1: "figure1-variance-per-epoch", 2: "figure2-variance-boxplots", 4: "figure4-variance-missing-patches"}


# --- runs ---------------------------------------------------------------------------------------
def find_runs(paths):
    """Run directories (holding ``checkpoint.pt``) named by ``paths`` or below them, sorted."""
    found = set()
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise RunError(f"{path} does not exist")
        if (path / CHECKPOINT).is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p.parent for p in path.rglob(CHECKPOINT))
    if not found:
        raise RunError(f"no run directory ({CHECKPOINT}) found in {', '.join(map(str, paths))}")
    return sorted(found)


class Run:
    """What the figures need of one run directory: its settings and recorded history."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        checkpoint = torch_load(self.path / CHECKPOINT, map_location="cpu")
        self.config = checkpoint["config"]
        self.args = checkpoint["args"]
        self.history = checkpoint["history"]
        self.method = self.config["method"]
        self.patches = self.config.get("missing_patches") or 0

    @property
    def recorded(self):
        return [h for h in self.history if h.get("var_q_hat") is not None]

    def label(self, with_dataset=False, with_K=False):
        label = self.method + (f", {self.patches} patches missing" if self.patches else "")
        extra = ([self.config["dataset"]] if with_dataset else []) + ([f"K={self.config['K']}"] if with_K else [])
        return label + (f" ({', '.join(extra)})" if extra else "")

    def sort_key(self):
        method = self.method
        order = ALL_METHOD_ORDER.index(method) if method in ALL_METHOD_ORDER else len(ALL_METHOD_ORDER)
        return (self.config["dataset"], order, self.patches, self.config["K"], self.config["seed"], str(self.path))


def group_runs(runs):
    """``{label: [runs]}`` in the paper's order of methods; labels carry the data set and K
    only when the runs differ in them."""
    runs = sorted(runs, key=Run.sort_key)
    with_dataset = len({r.config["dataset"] for r in runs}) > 1
    with_K = len({r.config["K"] for r in runs}) > 1
    groups = {}
    for run in runs:
        groups.setdefault(run.label(with_dataset, with_K), []).append(run)
    return groups


def final_variances(run, num_data=None, num_repeats=None, device="cpu", data_root=None, data_cache=None):
    """Per-datum variances (float64 CPU tensors) of eqs. (2) and (3) at the run's ``best.pt``, on
    the first ``num_data`` training images (default: the run's ``--record-variance``, else 100),
    in the random stream the run used at the best epoch: with the run's settings, their means
    are the history's entry of that epoch."""
    path = run.path / BEST
    if not path.is_file():
        raise RunError(f"{run.path} has no {BEST}: no epoch finished yet")
    best = torch_load(path, map_location=device)
    config = best["config"]
    num_data = num_data or run.args.get("record_variance") or DEFAULT_NUM_DATA
    num_repeats = num_repeats or run.args.get("variance_repeats") or DEFAULT_REPEATS
    root = data_root if data_root is not None else best.get("data_root")
    key = tuple(config.get(k) for k in ("dataset", "max_train", "max_eval", "eval_subset", "data_seed", "missing_patches")) + (root,)
    cache = {} if data_cache is None else data_cache
    if key not in cache:
        cache[key] = load_data(config, root)
    data = cache[key]
    pyro.clear_param_store()
    model = make_model(config, data, device)
    model.load_state_dict(best["model"])
    inputs = variance_subset(data, num_data, config["seed"], device, with_mask=config["method"] in MISSING_DATA_INPUTS)
    with torch.no_grad():
        variances = subset_variances(model, config["method"], config["K"], inputs, num_repeats, config["seed"], best["epoch"])
    return {
        **{name: values.cpu() for name, values in variances._asdict().items()},
        "epoch": best["epoch"],
        "num_data": len(inputs[0]),
        "num_repeats": num_repeats,
        "K": config["K"],
    }


# --- the figures --------------------------------------------------------------------------------
def _stats(values):
    values = sorted(float(v) for v in values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": quartiles[1],
        "q1": quartiles[0],
        "q3": quartiles[2],
        "min": values[0],
        "max": values[-1],
    }


def _run_info(run):
    c = run.config
    return {"run": str(run.path), "method": run.method, "dataset": c["dataset"], "model": c["model"], "K": c["K"],
            "J": c["J"], "seed": c["seed"], "missing_patches": run.patches}


def figure1(groups, png, title=""):
    """Figure 1: the recorded mean variance of eq. (2) (and of eq. 3) per epoch, per group
    (mean over its runs, min-max band); returns the JSON record."""
    from .images import save_variance_curves

    missing = [run for runs in groups.values() for run in runs if not run.recorded]
    if missing:
        names = ", ".join(str(r.path) for r in missing)
        raise RunError(
            f"no variance recorded in the history of {names}: train with --record-variance N (e.g. "
            "--record-variance 100; it records after every epoch), or leave Figure 1 out with --figures 2,4"
        )
    curves, record = {}, {"figure": 1, "groups": {}}
    keys = [f"var_{name}" for name in VarianceEstimate._fields]
    for label, runs in groups.items():
        epochs = sorted(set.intersection(*({h["epoch"] for h in run.recorded} for run in runs)))
        if not epochs:
            raise RunError(f"the runs of {label} recorded the variance at no common epoch")
        by_epoch = [{h["epoch"]: h for h in run.recorded} for run in runs]
        values = {key: [[b[e].get(key, math.nan) for b in by_epoch] for e in epochs] for key in keys}
        curves[label] = (epochs, values)
        record["groups"][label] = {
            "epoch": epochs,
            **{f"{key}_mean": [statistics.fmean(v) for v in values[key]] for key in keys},
            "runs": [_run_info(r) | {key: [b[e].get(key) for e in epochs] for key in keys} for r, b in zip(runs, by_epoch)],
        }
    save_variance_curves(curves, png, title)
    return record


def figure2(groups, finals, png, title=""):
    """Figure 2: box plots over the data of the per-datum variances of eqs. (2) and (3) at each
    group's best parameters (its runs' data pooled); returns the JSON record."""
    from .images import save_variance_boxplots

    boxes, record = {}, {"figure": 2, "groups": {}}
    for label, runs in groups.items():
        pooled = {name: [v for run in runs for v in finals[run.path][name].tolist()] for name in VarianceEstimate._fields}
        boxes[label] = {BOX_LABELS[name]: pooled[name] for name in BOX_LABELS}
        record["groups"][label] = {
            **{name: _stats(values) for name, values in pooled.items()},
            "runs": [_run_info(r) | _final_record(finals[r.path]) for r in runs],
        }
    save_variance_boxplots(boxes, png, title, ylabel="variance over importance samplings, per datum")
    return record


def figure4(groups, finals, png, title=""):
    """Figure 4: box plots of the per-datum variance of eq. (9) with α = 1 at the best parameters,
    one box per method and number of missing patches; returns the JSON record."""
    from .images import save_variance_boxplots

    by_patches = {}
    for runs in groups.values():
        for run in runs:
            by_patches.setdefault(run.patches, {}).setdefault(run.method, []).append(run)
    boxes, record = {}, {"figure": 4, "patches": {}}
    for patches in sorted(by_patches):
        boxes[str(patches)], record["patches"][str(patches)] = {}, {}
        for method in sorted(by_patches[patches], key=lambda m: ALL_METHOD_ORDER.index(m)):
            runs = by_patches[patches][method]
            values = [v for run in runs for v in finals[run.path]["q_hat"].tolist()]
            boxes[str(patches)][method] = values
            record["patches"][str(patches)][method] = {
                "q_hat": _stats(values),
                "runs": [_run_info(r) | _final_record(finals[r.path]) for r in runs],
            }
    save_variance_boxplots(boxes, png, title, xlabel="patches missing", ylabel="variance of (9), α = 1, per datum")
    return record


def _final_record(final):
    return {
        "best_epoch": final["epoch"],
        "num_data": final["num_data"],
        "num_repeats": final["num_repeats"],
        **{f"var_{name}_mean": final[name].mean().item() for name in VarianceEstimate._fields},
        **{f"var_{name}": final[name].tolist() for name in VarianceEstimate._fields},
    }


def make_figures(paths, out, figures=None, num_data=None, num_repeats=None, device="cpu", data_root=None, log=print):
    """Draw the figures of the runs found under ``paths`` into the directory ``out``: for each
    number in ``figures`` (default: 1 and 2, and 4 when missing-data runs are among them), a PNG
    and a JSON of its numbers. Returns ``{number: png path}``."""
    runs = [Run(path) for path in find_runs(paths)]
    missing_runs = [r for r in runs if r.method in MISSING_DATA_INPUTS]
    wanted = sorted(set(figures)) if figures else [1, 2] + ([4] if missing_runs else [])
    if 4 in wanted and not missing_runs:
        raise RunError("Figure 4 needs runs of a missing-data method (miss-iwem, miss-iwem-woa, miss-iwae; "
                       "train --missing-patches N)")
    out = pathlib.Path(out)
    datasets = sorted({r.config["dataset"] for r in runs})
    title = ", ".join(datasets)
    groups = group_runs(runs)
    records = {}
    if 1 in wanted:  # checked before any computation: a run without a record fails fast
        records[1] = figure1(groups, out / f"{FIGURE_FILES[1]}.png", title)
    finals = {}
    needed = runs if 2 in wanted else missing_runs if 4 in wanted else []
    device = resolve_device(device)
    cache = {}
    for run in needed:
        finals[run.path] = final_variances(run, num_data, num_repeats, device, data_root, cache)
        f = finals[run.path]
        log(f"{run.path}: best epoch {f['epoch']}, mean variance over {f['num_data']} images "
            f"({f['num_repeats']} repeats, K={f['K']}): (2) {f['q_hat'].mean().item():.4g}, (3) "
            f"{f['joint'].mean().item():.4g} (θ-part), {f['elbo'].mean().item():.4g} (ELBO)")
    if 2 in wanted:
        records[2] = figure2(groups, finals, out / f"{FIGURE_FILES[2]}.png", title)
    if 4 in wanted:
        records[4] = figure4(group_runs(missing_runs), finals, out / f"{FIGURE_FILES[4]}.png", title)
    written = {}
    for number, record in records.items():
        png = out / f"{FIGURE_FILES[number]}.png"
        atomic_write_json(record, png.with_suffix(".json"))
        written[number] = png
    return written
