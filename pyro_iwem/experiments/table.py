"""Table-1-style summaries of finished runs (their ``metrics.json``).

Rows are methods in the paper's order (with K and J when a method was run with several, and
with every setting of :data:`SETTING_KEYS` in which the runs differ, such as ``L=50`` or
``protocol=official``), columns data sets (and models, when the runs use several); a cell is
``mean ± std (n)`` over the runs (seeds) that share its row and column, so runs of different
experiments are never pooled: rows are split, too, by the settings of :data:`RESULT_KEYS`
(``max_epochs``, ``patience``, ...) where runs that would share a row differ in them, and a
run found twice (a copy: the same settings and seed) is counted once. A second table gives
the mean wall-clock seconds per run.
"""

import csv
import io
import math
import pathlib
import statistics

from .checkpoint import METRICS, read_json
from .errors import RunError
from .setup import ALL_METHOD_ORDER, CONFIG_KEYS, DATASETS, LEGACY_CONFIG, MODELS, USES_J

#: the run settings besides the row's (method, K, J), the column's (dataset, model, missing
#: patches) and the seeds: runs that differ in one of them are different experiments, and
#: every row is labelled with its value of each one in which the tabled runs differ
SETTING_KEYS = tuple(
    k for k in CONFIG_KEYS if k not in ("method", "K", "J", "dataset", "model", "missing_patches", "seed", "data_seed")
)

#: settings recorded in ``metrics.json`` besides :data:`~.setup.CONFIG_KEYS` that change a
#: run's result: the epoch budget and early stopping of ``train``, the test bound's samples
#: (for the ``test_ll`` metric, which ``eval_K`` draws) and the settings of ``impute``. Runs that
#: differ in one of them within a row and column of :data:`SETTING_KEYS` get rows of their own,
#: labelled with it
RESULT_KEYS = ("max_epochs", "patience", "eval_K", "steps", "impute_K", "missing_rate", "likelihood", "z_dim")

#: The paper's Table 1 (test log-likelihood, nats, mean of 5 runs): ``(dataset, model) -> {method: value}``
PAPER_TABLE_1 = {
    ("static-mnist", "mlp"): {"iwae": -88.86, "iwem-woo": -87.97, "iwem-woa": -87.59, "iwem": -87.71},
    ("dynamic-mnist", "mlp"): {"iwae": -87.64, "stl": -87.43, "dreg": -87.76, "iwem-woo": -86.99,
                               "iwem-woa": -86.61, "iwem": -86.68},
    ("omniglot", "mlp"): {"iwae": -107.23, "stl": -106.40, "dreg": -106.70, "iwem-woo": -106.59,
                          "iwem-woa": -106.5, "iwem": -106.20},
    ("caltech101", "mlp"): {"iwae": -124.31, "iwem-woo": -123.66, "iwem-woa": -124.19, "iwem": -123.50},
    ("static-mnist", "cnn"): {"vae": -84.63, "iwae": -83.54, "iwem-woo": -83.84, "iwem-woa": -83.32, "iwem": -83.77},
    ("dynamic-mnist", "cnn"): {"vae": -84.08, "iwae": -81.56, "iwem-woo": -81.32, "iwem-woa": -81.07,
                               "iwem": -81.28},
    ("omniglot", "cnn"): {"vae": -101.63, "iwae": -100.27, "iwem-woo": -100.24, "iwem-woa": -100.15,
                          "iwem": -100.39},
    ("caltech101", "cnn"): {"vae": -109.24, "iwae": -106.94, "iwem-woo": -106.65, "iwem-woa": -106.19,
                            "iwem": -106.05},
}  # fmt: skip


def find_metrics(paths):
    """``[(path, metrics)]`` of the ``metrics.json`` files named by ``paths``: a file, a run
    directory, or any parent directory (searched recursively). Sorted by path, no repeats."""
    found = set()
    for path in map(pathlib.Path, paths):
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            found.update(p.resolve() for p in path.rglob(METRICS) if p.is_file())
        else:
            raise RunError(f"{path} does not exist")
    records = []
    for path in sorted(found):
        try:
            records.append((path, read_json(path)))
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {path}: {e}") from None
    return records


def _order(value, order):
    return (order.index(value), "") if value in order else (len(order), str(value))


class _Absent:
    def __repr__(self):
        return "absent"


#: the setting of a run that has none (an imputation baseline has no learning rate)
ABSENT = _Absent()


def _setting(m, key):
    """A run's setting ``key``, read as the paper's for runs made before the key existed
    (:data:`~.setup.LEGACY_CONFIG`), :data:`ABSENT` for a run that has no such setting.
    ``eval_subset`` (which validation and test images ``max_eval`` keeps) is :data:`ABSENT`
    for runs that kept them all."""
    if key == "eval_subset" and m.get("max_eval") is None:
        return ABSENT
    return m[key] if key in m else LEGACY_CONFIG.get(key, ABSENT)


def _identity(m):
    """What makes a run the run it is: its settings (:data:`~.setup.CONFIG_KEYS`, seed
    included, and :data:`RESULT_KEYS`), as a hashable value; copies of a run share it."""
    keys = ("method", "dataset", *CONFIG_KEYS, *RESULT_KEYS)
    return tuple((key, repr(_setting(m, key))) for key in dict.fromkeys(keys))


def unique_runs(metrics_list):
    """``(runs, copies)``: ``metrics_list`` with each configuration and seed (:func:`_identity`)
    kept once, the first, and the number of copies left out (a run that records no seed is
    never taken for a copy)."""
    seen, runs = set(), []
    for number, m in enumerate(metrics_list):
        identity = _identity(m) if "seed" in m else number
        if identity not in seen:
            seen.add(identity)
            runs.append(m)
    return runs, len(metrics_list) - len(runs)


def _row_key(m, with_particles, varying=()):
    settings = tuple((key, _setting(m, key)) for key in varying)
    if not with_particles:
        return (m["method"], None, None, settings)
    return (m["method"], m.get("K"), m.get("J") if m["method"] in USES_J else None, settings)


def _distinct(runs, key):
    return len({repr(_setting(m, key)) for m in runs} - {repr(ABSENT)}) > 1


def _varying_settings(runs, metric="test_ll"):
    """The settings by which ``runs`` (metrics dicts) are told apart in rows: the
    :data:`SETTING_KEYS` in which the runs that have them differ, then the
    :data:`RESULT_KEYS` in which runs that these would put in one row and column differ
    (``eval_K`` only for the ``test_ll`` metric, the one it draws)."""
    varying = tuple(key for key in SETTING_KEYS if _distinct(runs, key))
    groups = {}
    for m in runs:
        groups.setdefault((_row_key(m, True, varying), _col_key(m, True)), []).append(m)
    extra = tuple(
        key for key in RESULT_KEYS
        if (key != "eval_K" or metric == "test_ll") and any(_distinct(group, key) for group in groups.values())
    )
    return varying + extra


def _settings_label(settings):
    return " ".join(f"{key}={value}" for key, value in settings if value is not ABSENT)


def _row_label(key):
    method, K, J, settings = key
    label = method if K is None else f"{method} K={K}" + (f" J={J}" if J is not None else "")
    return f"{label} {_settings_label(settings)}" if settings else label


def _row_sort(key):
    method, K, J, settings = key
    return (_order(method, ALL_METHOD_ORDER), K or 0, J or 0, repr(settings))


def _col_key(m, with_model):
    return (m["dataset"], m.get("model") if with_model else None, m.get("missing_patches") or 0)


def _col_label(key):
    dataset, model, patches = key
    label = dataset if model is None else f"{dataset} / {model}"
    return label + (f", {patches} patches missing" if patches else "")


def _col_sort(key):
    return (_order(key[0], DATASETS), _order(key[1], MODELS) if key[1] else (0, ""), key[2])


def summarize(metrics_list, metric="test_ll", with_particles=None, with_model=None):
    """Group runs into cells. Rows carry K and J when ``with_particles`` is true (default:
    when some method was run with several values), columns the model when ``with_model`` is
    true (default: when the runs use several models).

    :returns: ``(rows, cols, cells, skipped)``: sorted row and column keys, a dict
        ``(row, col) -> {"values": [...], "wall": [...]}`` and the number of runs without
        a finite ``metric``.
    """
    runs = []
    skipped = 0
    metrics_list, _ = unique_runs(metrics_list)
    for m in metrics_list:
        value = m.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            skipped += 1
            continue
        runs.append(m)
    combos = {}
    for m in runs:
        combos.setdefault(m["method"], set()).add(_row_key(m, True)[1:3])
    varying = _varying_settings(runs, metric)
    if with_particles is None:
        with_particles = any(len(c) > 1 for c in combos.values())
    if with_model is None:
        with_model = len({m.get("model") for m in runs}) > 1
    cells = {}
    for m in runs:
        row = _row_key(m, with_particles, varying)
        cell = cells.setdefault((row, _col_key(m, with_model)), {"values": [], "wall": []})
        cell["values"].append(float(m[metric]))
        if isinstance(m.get("wall_seconds"), (int, float)):
            cell["wall"].append(float(m["wall_seconds"]))
    rows = sorted({r for r, _ in cells}, key=_row_sort)
    cols = sorted({c for _, c in cells}, key=_col_sort)
    return rows, cols, cells, skipped


def mean_std(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def format_cell(values, digits=2):
    """``"mean ± std (n)"``; ``"mean (1)"`` for a single run."""
    if not values:
        return ""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values)})"


def format_seconds(seconds):
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 36000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _markdown(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_table(metrics_list, metric="test_ll", fmt="markdown", against=None, paper=False):
    """The table of ``metrics_list`` (dicts from ``metrics.json``) as a string; in markdown, with
    ``against`` (a method) a table of each row's difference to that method's row
    (:func:`differences`), and with ``paper`` the paper's Table 1 beside each column
    (:data:`PAPER_TABLE_1`; columns then name their model)."""
    with_model = True if fmt == "csv" or paper else None
    rows, cols, cells, skipped = summarize(metrics_list, metric, True if fmt == "csv" else None, with_model)
    if not cells:
        raise RunError(f"no run has a finite {metric!r} in its metrics")
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            ["method", "K", "J", "settings", "dataset", "model", "missing_patches", "metric", "mean", "std", "n", "wall_seconds_mean"]
        )
        for r in rows:
            for c in cols:
                if (r, c) in cells:
                    cell = cells[r, c]
                    mean, std = mean_std(cell["values"])
                    wall = statistics.fmean(cell["wall"]) if cell["wall"] else math.nan
                    row = [*r[:3], _settings_label(r[3]), *c, metric, mean, std, len(cell["values"]), wall]
                    writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
        return buf.getvalue().rstrip("\n")
    if fmt != "markdown":
        raise RunError(f"unknown table format {fmt!r}; use markdown or csv")

    header = ["method"] + [_col_label(c) for c in cols]
    digits = 2 if max(abs(v) for cell in cells.values() for v in cell["values"]) >= 10 else 3  # nats vs MSE
    body = [[_row_label(r)] + [format_cell(cells[r, c]["values"], digits) if (r, c) in cells else "" for c in cols] for r in rows]
    if paper:
        header = [header[0]] + [h for c in cols for h in (_col_label(c), "paper")]
        body = [[line[0]] + [v for c, cell in zip(cols, line[1:]) for v in (cell, _paper_cell(r, c))]
                for r, line in zip(rows, body)]  # fmt: skip
    wall = [
        [_row_label(r)]
        + [format_seconds(statistics.fmean(cells[r, c]["wall"])) if (r, c) in cells and cells[r, c]["wall"] else "" for c in cols]
        for r in rows
    ]
    what = "test log-likelihood, nats" if metric.startswith("test_ll") else "nats" if metric.endswith("_ll") else ""
    parts = [
        f"**{metric}**" + (f" ({what})" if what else "") + ": mean ± std (number of runs)",
        "",
        _markdown(header, body),
    ]
    if against is not None:
        parts += ["", *_differences_table(rows, cols, cells, against, digits)]
    parts += [
        "",
        "**wall-clock time per run** (mean)",
        "",
        _markdown(["method"] + [_col_label(c) for c in cols], wall),
    ]
    settings = _settings(metrics_list)
    if settings:
        parts += ["", settings]
    notes = sorted({(m["dataset"], m["note"]) for m in metrics_list if m.get("note")})
    parts += [f"\nNote ({dataset}): {note}" for dataset, note in notes]
    if skipped:
        parts += [f"\n({skipped} run(s) without a finite {metric} left out)"]
    _, copies = unique_runs(metrics_list)
    if copies:
        parts += [f"\n({copies} copy(ies) of a run already tabled (same settings and seed) left out)"]
    return "\n".join(parts)


def _paper_cell(row, col):
    dataset, model, patches = col
    value = None if patches else PAPER_TABLE_1.get((dataset, model), {}).get(row[0])
    return "" if value is None else f"{value:.2f}"


def pooled_std(cells, col):
    """``(s, degrees of freedom)``: the standard deviation over seeds pooled over the rows of
    column ``col`` that have two runs or more, :math:`s^2 = \\sum_r (n_r - 1) s_r^2 / \\sum_r (n_r - 1)`."""
    groups = [cell["values"] for (_, c), cell in cells.items() if c == col and len(cell["values"]) > 1]
    dof = sum(len(v) - 1 for v in groups)
    if not dof:
        return math.nan, 0
    return math.sqrt(sum((len(v) - 1) * statistics.variance(v) for v in groups) / dof), dof


def differences(rows, cols, cells, against):
    """``{(row, col): (difference, standard error)}``: each row's mean minus the mean of the row of
    method ``against`` with the same K and settings, in the same column; the standard error
    :math:`s \\sqrt{1/n + 1/n_{against}}` with :math:`s` the column's :func:`pooled_std`, so that a
    method run with one seed has one too."""
    found = {}
    for col in cols:
        s, _ = pooled_std(cells, col)
        for row in rows:
            ref = (against, row[1], row[2] if against in USES_J else None, row[3])
            if (row, col) not in cells or (ref, col) not in cells or ref == row:
                continue
            values, base = cells[row, col]["values"], cells[ref, col]["values"]
            found[row, col] = (statistics.fmean(values) - statistics.fmean(base),
                               s * math.sqrt(1 / len(values) + 1 / len(base)))  # fmt: skip
    return found


def _differences_table(rows, cols, cells, against, digits):
    """The markdown lines of :func:`differences`, titled, with each column's pooled deviation."""
    if not any(r[0] == against for r in rows):
        raise RunError(f"--against {against}: no run of that method among the tabled runs")
    found = differences(rows, cols, cells, against)
    cell = "{:+.%df} ({:.%df})" % (digits, digits)
    body = [[_row_label(r)] + [cell.format(*found[r, c]) if (r, c) in found else "" for c in cols]
            for r in rows if any((r, c) in found for c in cols)]  # fmt: skip
    pooled = "; ".join(f"{_col_label(c)}: s = {s:.{digits}f} ({dof} d.f.)" for c in cols for s, dof in [pooled_std(cells, c)])
    return [
        f"**difference to {against}** (standard error), from the seed standard deviation pooled over each column's "
        f"methods with two runs or more ({pooled})",
        "",
        _markdown(["method"] + [_col_label(c) for c in cols], body),
    ]


def _settings(metrics_list):
    """One line of the settings shared by all runs (or their ranges)."""
    items = []
    keys = ("K", "J", "L", "eval_K", "epochs", "n_train", "batch_size", "lr", "anneal_increment", "anneal_start", "steps",
            "impute_K", "missing_rate", "protocol", "score_inflation")
    for key in keys:
        values = sorted({m[key] for m in metrics_list if m.get(key) is not None})
        if len(values) == 1:
            items.append(f"{key}={values[0]}")
        elif values:
            items.append(f"{key}={values[0]}..{values[-1]}")
    return "Settings: " + ", ".join(items) if items else ""


def table_of_paths(paths, metric="test_ll", fmt="markdown", against=None, paper=False):
    """:func:`format_table` of the runs found below ``paths``."""
    records = find_metrics(paths)
    if not records:
        raise RunError(f"no {METRICS} found in {', '.join(map(str, paths))}")
    return format_table([m for _, m in records], metric, fmt, against, paper)


def save_curves_of_paths(paths, png):
    """Plot the validation curves of the finished runs under ``paths``, grouped as the
    table's rows are (method in the paper's order, and the settings the runs differ in), from
    each run's checkpoint history."""
    from .checkpoint import CHECKPOINT, torch_load
    from .images import save_method_curves

    records = find_metrics(paths)
    kept = {id(m) for m in unique_runs([m for _, m in records])[0]}
    records = [(path, m) for path, m in records if id(m) in kept]
    varying = _varying_settings([m for _, m in records])
    histories = {}
    for path, metrics in records:
        if not (path.parent / CHECKPOINT).is_file():
            raise RunError(f"{path.parent} has no {CHECKPOINT}, whose history --curves plots; leave it out of the paths")
        checkpoint = torch_load(path.parent / CHECKPOINT, map_location="cpu")
        histories.setdefault(_row_key(metrics, False, varying), []).append(checkpoint["history"])
    order = sorted(histories, key=_row_sort)
    datasets = sorted({m["dataset"] for _, m in records})
    save_method_curves({_row_label(row): histories[row] for row in order}, png, title=", ".join(datasets))
