"""``pyro-iwem impute`` on a table with real gaps: exactly the missing cells filled and every
other byte of the file kept, the fill report, multiple imputations, and the errors."""

import csv
import io
import json

import numpy as np
import pyro
import pytest
import torch

from pyro_iwem.data import read_table
from pyro_iwem.experiments.cli import main
from pyro_iwem.infer import Imputer

from .test_impute import QUICK, correlated_table, impute, one_error_line, write_csv
from .test_missing import LinearGaussian, _closed_form_conditional

#: The texts of the missing cells, in turn: every spelling the loader must read as missing.
HOLES = ["", "nan", "NaN", "NA", " n/a ", "?", "null", "-nan"]
#: Rows whose numeric cells are all missing (written as a row of empty fields).
EMPTY_ROWS = (3, 17)


def gappy_table(n, rate, seed):
    """``(lines, truth, holes)``: a CSV with a text column first and a label column last, the
    correlated columns a, b, c written in three styles, ``rate`` of their cells and every cell of
    rows :data:`EMPTY_ROWS` missing, a blank line after row 5 and row 8 quoted; ``truth`` is the
    table as written (``(n, 3)``), ``holes`` True where a cell is missing."""
    rng = np.random.default_rng(seed)
    values = correlated_table(n, seed)
    texts = [[f"{v:.6f}", f"{w:.4e}", f" {u:.3f}"] for v, w, u in values]
    truth = np.array([[float(t) for t in row] for row in texts])
    holes = rng.random((n, 3)) < rate
    holes[list(EMPTY_ROWS)] = True
    lines = ["id,a,b,c,label"]
    k = 0
    for i in range(n):
        cells = []
        for j in range(3):
            cells.append(HOLES[k % len(HOLES)] if holes[i, j] else texts[i][j])
            k += holes[i, j]
        if i in EMPTY_ROWS:
            lines.append(",,,,")
            continue
        row = [f"r{i}", *cells, "yes" if i % 2 else "no"]
        lines.append(",".join(f'"{c}"' for c in row) if i == 8 else ",".join(row))
        if i == 5:
            lines.append("")
    return lines, truth, holes


def fields(line):
    return next(csv.reader(io.StringIO(line)), [])


def filled_values(path):
    """The a, b, c cells of a completed file (``(rows, 3)``)."""
    rows = [fields(line) for line in path.read_text().splitlines() if line]
    return np.array([[float(cell) for cell in row[1:4]] for row in rows[1:]])


def fill(csv_file, out, method, *extra):
    return impute(csv_file, out, method, "--drop-columns", "id,label", *extra, benchmark=False)


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    lines, truth, holes = gappy_table(40, 0.25, seed=2)
    path = tmp_path_factory.mktemp("gaps") / "gappy.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, lines, truth, holes


@pytest.fixture(scope="module")
def filled(gappy, tmp_path_factory):
    """Runs on the gappy table by method (miss-iwem with 3 multiple imputations) and their stdout."""
    root, runs = tmp_path_factory.mktemp("filled"), {}
    capture = pytest.MonkeyPatch()
    for method, extra in (("mean", ()), ("miss-iwem", (*QUICK, "--multiple", "3"))):
        out = io.StringIO()
        capture.setattr("sys.stdout", out)
        assert fill(gappy[0], root / method, method, *extra) == 0
        capture.undo()
        runs[method] = root / method, out.getvalue()
    return runs


# --- the completed file --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mean", "miss-iwem"])
def test_only_the_missing_cells_change(gappy, filled, method):
    path, lines, truth, holes = gappy
    run_dir, _ = filled[method]
    for name in ["imputed.csv"] + (["imputed-1.csv", "imputed-2.csv", "imputed-3.csv"] if method != "mean" else []):
        out = (run_dir / name).read_text()
        assert out.endswith("\n")
        out_lines = out.splitlines()
        assert len(out_lines) == len(lines)  # header, blank line and the rows of empty cells kept, in order
        rows = [i for i, line in enumerate(lines) if i and line]
        assert len(rows) == 40
        for r, i in enumerate(rows):
            if not holes[r].any():
                assert out_lines[i] == lines[i]  # byte for byte
                continue
            before, after = fields(lines[i]), fields(out_lines[i])
            assert [before[0], before[4]] == [after[0], after[4]]  # the dropped columns as written
            for j in range(3):
                if holes[r, j]:
                    assert np.isfinite(float(after[j + 1]))
                else:
                    assert after[j + 1] == before[j + 1]
            if i == rows[8]:  # a quoted row stays quoted
                assert all(f'"{before[k]}"' in out_lines[i] for k in (0, 4) + tuple(j + 1 for j in range(3) if not holes[r, j]))
            elif r not in EMPTY_ROWS:  # unquoted fields compared as written, blanks included
                raw_before, raw_after = lines[i].split(","), out_lines[i].split(",")
                assert [raw_before[j + 1] for j in range(3) if not holes[r, j]] == [
                    raw_after[j + 1] for j in range(3) if not holes[r, j]
                ]
        assert out_lines[0] == lines[0] and out_lines[7] == ""


def test_mean_fills_the_observed_column_means(gappy, filled):
    _, _, truth, holes = gappy
    values = filled_values(filled["mean"][0] / "imputed.csv")
    means = np.array([truth[~holes[:, j], j].mean() for j in range(3)])
    assert np.allclose(values[holes], np.broadcast_to(means, truth.shape)[holes], rtol=1e-12)
    assert np.array_equal(values[~holes], truth[~holes])


def test_fill_report(gappy, filled):
    _, _, _, holes = gappy
    run_dir, stdout = filled["miss-iwem"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    counts = dict(zip("abc", holes.sum(0).tolist()))
    assert metrics["mode"] == "fill" and metrics["filled"] == counts and metrics["columns"] == ["a", "b", "c"]
    assert metrics["n_missing"] == holes.sum() and metrics["n_rows"] == 40 and metrics["missing_rate"] is None
    assert metrics["rows_without_observed"] == len(EMPTY_ROWS) and metrics["multiple"] == 3
    assert metrics["files"] == ["imputed.csv", "imputed-1.csv", "imputed-2.csv", "imputed-3.csv"]
    assert "mse" not in metrics
    assert f"filled {holes.sum()} missing cells of 40 x 3 (2 row(s) had no observed cell)" in stdout
    assert "cells filled per column:" in stdout
    for name, count in counts.items():
        assert f"  {name}  {count}\n" in stdout


def test_multiple_imputations_differ_where_missing(gappy, filled):
    _, _, truth, holes = gappy
    run_dir, _ = filled["miss-iwem"]
    draws = np.stack([filled_values(run_dir / f"imputed-{m}.csv") for m in (1, 2, 3)])
    assert all(np.array_equal(d[~holes], truth[~holes]) for d in draws)
    assert (draws[0][holes] != draws[1][holes]).all() and (draws[1][holes] != draws[2][holes]).all()
    assert np.isfinite(draws).all()


def test_fill_beats_mean_imputation_on_held_back_truth(tmp_path):
    """A correlated table with 20 % of its cells blanked: a short miss-IWEM fit fills them far
    better than the column means (seed 3, 150 steps: MSE 0.069 against mean imputation's 0.88,
    in units of each column's standard deviation)."""
    lines, truth, holes = gappy_table(200, 0.2, seed=1)
    path = tmp_path / "gaps.csv"
    path.write_text("\n".join(lines) + "\n")
    errors = {}
    for method, extra in (("mean", ()), ("miss-iwem", ("--steps", "150", "--impute-K", "100", "--quiet"))):
        assert fill(path, tmp_path / method, method, *extra) == 0
        values = filled_values(tmp_path / method / "imputed.csv")
        assert np.array_equal(values[~holes], truth[~holes])
        errors[method] = float(((((values - truth) / truth.std(0)) ** 2)[holes]).mean())
    print(errors)
    assert errors["miss-iwem"] < 0.5 * errors["mean"], errors


def test_more_missing_texts_and_no_header(tmp_path):
    rows = [[f"{v:.3f}" for v in row] for row in correlated_table(20)]
    rows[2][1], rows[7][0] = "-999", "-999"
    path = write_csv(tmp_path / "plain.csv", rows, header=None)
    assert impute(path, tmp_path / "r", "mean", "--missing-values", "-999", benchmark=False) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["filled"] == {"0": 1, "1": 1, "2": 0}
    out = (tmp_path / "r" / "imputed.csv").read_text().splitlines()
    assert out[0] == ",".join(rows[0]) and "-999" not in "".join(out)


def test_read_table_keeps_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "bom.csv"
    rows = [",".join(f"{v:.2f}" for v in row) for row in correlated_table(12)]
    rows[4] = ",nan," + rows[4].split(",")[2]
    path.write_bytes(b"\xef\xbb\xbf" + ("a,b,c\r\n" + "\r\n".join(rows) + "\r\n").encode())
    table = read_table(path)
    assert table.header and table.encoding == "utf-8-sig" and table.missing_counts() == {"a": 1, "b": 1, "c": 0}
    text = table.completed_text(np.where(table.observed, table.values, 1.25))
    expected = rows[:4] + ["1.25,1.25," + rows[4].split(",")[2]] + rows[5:]
    assert text == "a,b,c\r\n" + "\r\n".join(expected) + "\r\n"


# --- errors ------------------------------------------------------------------------------------
def test_complete_table_has_nothing_to_fill(tmp_path, capsys):
    path = write_csv(tmp_path / "complete.csv", correlated_table(20))
    line = one_error_line(capsys, impute(path, tmp_path / "r", "mean", benchmark=False))
    assert "complete.csv" in line and "nothing to fill" in line and "--benchmark" in line
    assert not (tmp_path / "r").exists()


def test_text_among_gaps_is_named_with_its_remedies(gappy, tmp_path, capsys):
    path, lines, _, _ = gappy
    bad = tmp_path / "bad.csv"
    text = fields(lines[10])
    bad.write_text("\n".join(lines[:10] + [",".join([text[0], text[1], "unknown", text[3], text[4]])] + lines[11:]) + "\n")
    line = one_error_line(capsys, fill(bad, tmp_path / "r", "mean"))
    assert "bad.csv" in line and "column 'b' (index 2) is not numeric (line 11: 'unknown')" in line
    assert "--drop-columns" in line and "--missing-values 'unknown'" in line
    assert fill(bad, tmp_path / "r", "mean", "--missing-values", "unknown") == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--missing-rate", "0.3"], "--missing-rate is the rate of --benchmark"),
        (["--multiple", "2"], "--multiple needs a trained --method"),
    ],
)
def test_options_of_the_other_protocol(gappy, tmp_path, capsys, extra, message):
    assert message in one_error_line(capsys, fill(gappy[0], tmp_path / "r", "mean", *extra))


def test_benchmark_needs_a_complete_table(gappy, tmp_path, capsys):
    line = one_error_line(capsys, impute(gappy[0], tmp_path / "r", "mean", "--drop-columns", "id,label"))
    assert "gappy.csv: column 'a' (index 1) " in line and "a complete table is needed" in line
    assert "without --benchmark" in line


def test_column_without_an_observed_cell(tmp_path, capsys):
    rows = [[f"{v:.3f}" for v in row[:2]] + [""] for row in correlated_table(20)]
    path = write_csv(tmp_path / "hollow.csv", rows)
    line = one_error_line(capsys, impute(path, tmp_path / "r", "mean", benchmark=False))
    assert "column 'c' (index 2) has no observed value" in line and "--drop-columns" in line


def test_multiple_is_not_for_the_benchmark(tmp_path, capsys):
    assert "--multiple applies to filling" in one_error_line(
        capsys, main(["impute", "--dataset", "banknote", "--method", "miss-iwae", "--multiple", "2", "--out", str(tmp_path / "r")])
    )


# --- the resampling draw, chunked ---------------------------------------------------------------
def test_chunked_resampling_follows_the_closed_form_conditional():
    """:meth:`Imputer.sample` with ``chunk_size=7`` over K = 200 particles (28 chunks and one of 4)
    is sampling importance resampling over all 200: over 20 000 copies of one datum the draws' mean
    and variance match p(x_m | x_o) (SE of the mean about 0.015). The guide N(0.45, 0.8²) is far
    from the posterior N(1.2, 0.2), so a pick that kept one chunk's particles would be off by ~0.3."""
    m = LinearGaussian()
    n = 20000
    x = torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64).expand(n, 3)
    mask = torch.tensor([True, False, False]).expand(n, 3)
    imputer = Imputer(m.model, m.guide)
    pyro.set_rng_seed(1)
    draws = imputer.sample(x, mask, num_particles=200, mean=False, chunk_size=7)
    mean, var = _closed_form_conditional(x[:1], mask[:1], m.w)
    assert draws[:, 1:].mean(0).tolist() == pytest.approx(mean[0, 1:].tolist(), abs=0.05)
    assert draws[:, 1:].var(0).tolist() == pytest.approx(var[0, 1:].tolist(), rel=0.05)
    assert torch.equal(draws[:, 0], x[:, 0])
    for chunk_size in (200, 500):  # one chunk: the unchunked draw, same random numbers
        pyro.set_rng_seed(2)
        one = imputer.sample(x[:50], mask[:50], num_particles=200, mean=False, chunk_size=chunk_size)
        pyro.set_rng_seed(2)
        assert torch.equal(one, imputer.sample(x[:50], mask[:50], num_particles=200, mean=False))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        imputer.sample(x, mask, chunk_size=0)


# --- images ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A one-epoch miss-IWAE run on the 8x8 digits (a few seconds)."""
    out = tmp_path_factory.mktemp("train") / "run"
    argv = ["train", "--dataset", "digits-8x8", "--model", "mlp", "--method", "miss-iwae", "--missing-patches", "3",
            "--epochs", "1", "--max-train", "100", "--max-eval", "20", "--K", "3", "--eval-K", "5", "--valid-K", "3",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    return out


def digit_images(n=12, seed=0):
    """``n`` binary 8x8 images with random 0/1 pixels and the bottom half missing (NaN)."""
    x = (np.random.default_rng(seed).random((n, 8, 8)) < 0.3).astype(np.float64)
    x[:, 5:] = np.nan
    return x


def impute_images(tmp_path, images, *extra, run=None):
    np.save(tmp_path / "images.npy", images)
    argv = ["impute", "--images", str(tmp_path / "images.npy"), "--impute-K", "20", "--out", str(tmp_path / "out"), *extra]
    return main(argv + ([] if run is None else ["--run", str(run)]))


def test_images_with_missing_pixels_completed(image_run, tmp_path, capsys):
    images = digit_images()
    mask = np.ones(images.shape, dtype=bool)
    mask[:, 0, :2] = False  # observed pixels the --mask marks missing
    np.save(tmp_path / "mask.npy", mask)
    assert impute_images(tmp_path, images, "--mask", str(tmp_path / "mask.npy"), "--multiple", "2", run=image_run) == 0
    missing = np.isnan(images) | ~mask
    completed = np.load(tmp_path / "out" / "completed.npy")
    assert completed.shape == images.shape and completed.dtype == np.float32
    assert np.array_equal(completed[~missing], images[~missing])
    assert ((completed[missing] > 0) & (completed[missing] < 1)).all()  # E[x_m | x_o]: probabilities
    draws = [np.load(tmp_path / "out" / f"completed-{m}.npy") for m in (1, 2)]
    assert all(np.isin(d[missing], (0, 1)).all() and np.array_equal(d[~missing], images[~missing]) for d in draws)
    assert (draws[0] != draws[1]).any()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mode"] == "images" and metrics["n_missing"] == missing.sum() and metrics["method"] == "miss-iwae"
    assert metrics["files"] == ["completed.npy", "completed.png", "completed-1.npy", "completed-2.npy"]
    assert (tmp_path / "out" / "completed.png").stat().st_size > 0
    assert f"filled {missing.sum()} missing pixels of 12 images of 8 x 8" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, extra, message",
    [
        (lambda x: x[:, :6], [], "shape (12, 6, 8); the run's model takes images of 8 x 8 pixels"),
        (lambda x: np.where(np.isnan(x), x, 0.5), [], "an observed pixel is 0.5"),
        (np.nan_to_num, [], "nothing to fill"),
        (lambda x: x, ["--method", "mean"], "--method apply to tables"),
        (lambda x: x, ["--no-run"], "--images needs --run"),
    ],
)
def test_image_errors(image_run, tmp_path, capsys, change, extra, message):
    run = None if extra == ["--no-run"] else image_run
    code = impute_images(tmp_path, change(digit_images()), *[e for e in extra if e != "--no-run"], run=run)
    assert message in one_error_line(capsys, code)


def test_table_options_are_not_for_images(tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", correlated_table(20))
    code = main(["impute", "--csv", str(path), "--method", "mean", "--mask", "m.npy", "--out", str(tmp_path / "r")])
    assert "--run and --mask are options of --images" in one_error_line(capsys, code)


def test_images_file_not_npy(image_run, tmp_path, capsys):
    (tmp_path / "images.npy").write_text("0,1,nan\n")
    code = main(["impute", "--images", str(tmp_path / "images.npy"), "--run", str(image_run), "--out", str(tmp_path / "out")])
    assert "is not a NumPy .npy array" in one_error_line(capsys, code)
    code = main(["impute", "--images", str(tmp_path / "absent.npy"), "--run", str(image_run), "--out", str(tmp_path / "out")])
    assert "cannot read --images" in one_error_line(capsys, code) and not (tmp_path / "out").exists()


def test_a_stray_quote_inside_a_field(tmp_path):
    """csv reads a quote inside an unquoted field as text; such a record with a gap is written
    again by csv (the field re-quoted), any other record as it was."""
    rows = [f"{i},{2 * i},{i % 3}" for i in range(12)] + ['1,2 5",', '7,8 "x" y,']
    path = tmp_path / "quotes.csv"
    path.write_text("a,b,c\n" + "\n".join(rows) + "\n")
    table = read_table(path, drop_columns=["b"])
    assert table.missing_counts() == {"a": 0, "c": 2}
    text = table.completed_text(np.where(table.observed, table.values, 9.0))
    assert text.splitlines()[-2:] == ['1,"2 5""",9.0', '7,8 "x" y,9.0']
    assert [fields(line)[1] for line in text.splitlines()[-2:]] == ['2 5"', '8 "x" y']
