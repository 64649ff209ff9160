"""``table`` never pools runs of different settings or counts one run twice; ``--max-eval``
takes a seeded random subset of the validation and test images."""

import pytest
import torch

from pyro_iwem.experiments.setup import TRAIN_DEFAULTS, load_data
from pyro_iwem.experiments.errors import RunError
from pyro_iwem.experiments.table import format_table

BASE = {"method": "iwem", "dataset": "static-mnist", "model": "mlp", "K": 5, "J": 5, "L": 1, "protocol": "paper"}


def rows(table):
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| method |"):
            label, cell = (part.strip() for part in line.split("|")[1:3])
            rows.setdefault(label, cell)  # the first table (the metric), not the wall-clock one
    return rows


def test_runs_of_different_epoch_budgets_get_rows_of_their_own_and_copies_count_once():
    runs = [{**BASE, "seed": 11, "max_epochs": e, "test_ll": -24.0 + e / 10} for e in (1, 2, 4, 5)]
    runs += [dict(runs[3]) for _ in range(3)]  # copies of one run (the same settings and seed)
    runs += [{**BASE, "seed": 12, "max_epochs": 5, "test_ll": -23.0}]
    table = format_table(runs)
    assert rows(table) == {
        "iwem max_epochs=1": "-23.90 (1)",
        "iwem max_epochs=2": "-23.80 (1)",
        "iwem max_epochs=4": "-23.60 (1)",
        "iwem max_epochs=5": "-23.25 ± 0.35 (2)",
    }
    assert "3 copy(ies) of a run already tabled" in table


def test_patience_splits_rows_and_a_shared_setting_stays_out_of_the_labels():
    runs = [{**BASE, "seed": s, "max_epochs": 10, "patience": p, "test_ll": -20.0 - s} for s in (1, 2) for p in (5, 50)]
    assert set(rows(format_table(runs))) == {"iwem patience=5", "iwem patience=50"}
    same = [{**BASE, "seed": s, "max_epochs": 10, "patience": 5, "test_ll": -20.0 - s} for s in (1, 2)]
    assert rows(format_table(same)) == {"iwem": "-21.50 ± 0.71 (2)"}


def test_a_different_eval_K_splits_test_ll_but_not_a_score_recorded_by_evaluate():
    runs = [{**BASE, "seed": k, "eval_K": k, "test_ll": -20.0, "test_ll_K100": -21.0 - k} for k in (1, 2)]
    assert set(rows(format_table(runs))) == {"iwem eval_K=1", "iwem eval_K=2"}
    assert rows(format_table(runs, metric="test_ll_K100")) == {"iwem": "-22.50 ± 0.71 (2)"}  # the same K=100 score


def test_max_eval_takes_a_seeded_random_subset_and_old_runs_keep_the_first_images():
    config = {**TRAIN_DEFAULTS, "dataset": "digits-8x8", "max_eval": 40}
    full = load_data({**config, "max_eval": None})
    data = load_data(config)
    assert len(data.valid) == len(data.test) == 40
    # a random subset: not the first 40, drawn again the same way, another with another seed
    assert not torch.equal(data.test, full.test[:40])
    assert torch.equal(data.test, load_data(config).test)
    assert not torch.equal(data.test, load_data({**config, "data_seed": 5}).test)
    rows_of_full = {tuple(row.tolist()) for row in full.test}
    assert all(tuple(row.tolist()) in rows_of_full for row in data.test)
    # a run made before: the first images
    old = load_data({**config, "eval_subset": "first"})
    assert torch.equal(old.test, full.test[:40]) and torch.equal(old.valid, full.valid[:40])


def test_a_run_records_its_random_eval_subset(tmp_path):
    import json

    from pyro_iwem.experiments.checkpoint import torch_load
    from pyro_iwem.experiments.cli import main

    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits-8x8", "--epochs", "1", "--max-train", "100", "--max-eval", "30", "--K", "2",
            "--J", "2", "--eval-K", "5", "--valid-K", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["eval_subset"] == "random"
    assert torch_load(out / "best.pt")["config"]["eval_subset"] == "random"


def test_differences_to_a_method_use_the_pooled_seed_deviation_and_the_paper_sits_beside():
    caltech = {**BASE, "dataset": "caltech101", "K": 50, "J": 50}
    runs = [{**caltech, "seed": s, "test_ll": v} for s, v in zip((1, 2, 3), (-121.0, -122.0, -121.5))]  # iwem
    runs += [{**caltech, "method": "iwae", "seed": s, "test_ll": v} for s, v in zip((1, 2), (-123.0, -122.0))]
    runs += [{**caltech, "method": "stl", "seed": 1, "test_ll": -121.2}]  # one seed
    table = format_table(runs, against="iwem", paper=True)
    # pooled: (2 * 0.25 + 1 * 0.5) / 3 d.f. -> s = sqrt(1/3) = 0.577
    assert "s = 0.58 (3 d.f.)" in table
    difference = table.split("**difference to iwem**")[1].split("**wall-clock")[0]
    assert "| iwae | -1.00 (0.53) |" in difference  # -122.5 + 121.5; 0.577 * sqrt(1/2 + 1/3)
    assert "| stl | +0.30 (0.67) |" in difference  # 0.577 * sqrt(1 + 1/3)
    assert "| iwem |" not in difference
    assert "| iwae | -122.50 ± 0.71 (2) | -124.31 |" in table and "| stl | -121.20 (1) |  |" in table
    assert "caltech101 / mlp | paper |" in table
    with pytest.raises(RunError, match="--against dreg: no run of that method"):
        format_table(runs, against="dreg")
