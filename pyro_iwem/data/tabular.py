"""Numeric tables: the UCI data sets of the MIWAE protocol, and any CSV file.

:func:`load_csv` reads a delimited text file into a float64 array, with or without a
header row, and rejects what the missing-data experiments cannot use (non-numeric or
non-finite values, constant columns, fewer than ``min_rows`` rows) with a
:class:`TableFormatError` naming the file and the column.
"""

import csv
import pathlib

import numpy as np

from .files import data_file

#: The UCI data sets: (file below the data root, delimiter, columns to drop).
UCI_DATASETS = {
    "banknote": ("uci/banknote/data_banknote_authentication.txt", ",", [4]),
    "breast": ("uci/breast_cancer_wisconsin/wdbc.data", ",", [0, 1]),
    "red-wine": ("uci/wine_quality/winequality-red.csv", ";", ["quality"]),
    "white-wine": ("uci/wine_quality/winequality-white.csv", ";", ["quality"]),
}

#: Default minimum number of data rows :func:`load_csv` accepts.
MIN_ROWS = 10


class TableFormatError(ValueError):
    """A table cannot be used as numeric data; the message names the file and column."""


def _is_number(text):
    """Whether ``text`` parses as a float (``nan`` and ``inf`` included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_rows(path, sep):
    """The non-blank rows of a delimited text file as lists of stripped strings."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [[field.strip() for field in row] for row in csv.reader(f, delimiter=sep)]
    return [row for row in rows if any(row)]


def _column_indices(drop_columns, names, path):
    """Resolve column names or (possibly negative) indices to non-negative indices."""
    indices = set()
    for column in drop_columns or ():
        if isinstance(column, (int, np.integer)) and not isinstance(column, bool):
            if not -len(names) <= column < len(names):
                raise TableFormatError(
                    f"{path}: cannot drop column index {column}; the table has {len(names)} columns"
                )
            indices.add(int(column) % len(names))
        elif str(column).isdigit() and str(column) not in names:
            indices |= _column_indices([int(column)], names, path)
        elif column in names:
            indices.add(names.index(column))
        else:
            raise TableFormatError(f"{path}: no column named {column!r}; columns are {names}")
    return indices


def _parse_column(values, label, path, first_line):
    """A column of strings as float64, or an error naming the column and offending line."""
    try:
        column = np.asarray(values, dtype=np.float64)
    except ValueError:
        column = None
    if column is not None and np.isfinite(column).all():
        return column
    for i, text in enumerate(values):
        if not _is_number(text) or not np.isfinite(float(text)):
            break
    problem = "is not finite" if _is_number(text) else "is not numeric"
    raise TableFormatError(
        f"{path}: column {label} {problem} (line {first_line + i}: {text!r}); "
        "drop it with --drop-columns or fix the file"
    )


def load_csv(path, sep=",", drop_columns=None, header=None, min_rows=MIN_ROWS):
    """Read a numeric delimited text file as a float64 array ``(rows, columns)``.

    Blank lines are skipped; fields may be quoted. With ``header=None`` the first row is
    taken as a header when none of its fields parses as a number (so a header such as
    ``"a","b"`` is detected, and a data row with some text fields is not mistaken for
    one).

    :param path: the file.
    :param str sep: field delimiter.
    :param drop_columns: columns to leave out, by header name or 0-based index
        (negative indices count from the end).
    :param bool header: whether the first row is a header; ``None`` detects it.
    :param int min_rows: the fewest data rows accepted (default 10: fewer cannot be
        standardised and split by missingness meaningfully).
    :raises TableFormatError: (a ``ValueError``) for ragged rows, a non-numeric or
        non-finite value, a constant column (drop it with ``--drop-columns``), or fewer
        than ``min_rows`` rows.
    """
    path = pathlib.Path(path)
    rows = _read_rows(path, sep)
    if not rows:
        raise TableFormatError(f"{path}: the file has no rows")
    if header is None:
        header = not any(_is_number(field) for field in rows[0])
    names = rows[0] if header else [str(i) for i in range(len(rows[0]))]
    data = rows[1:] if header else rows
    first_line = 2 if header else 1
    for i, row in enumerate(data):
        if len(row) != len(names):
            raise TableFormatError(
                f"{path}: row {first_line + i} has {len(row)} fields, expected {len(names)} "
                f"(is the delimiter {sep!r} right?)"
            )
    if len(data) < min_rows:
        raise TableFormatError(f"{path}: {len(data)} data rows, need at least {min_rows}")
    dropped = _column_indices(drop_columns, names, path)
    keep = [j for j in range(len(names)) if j not in dropped]
    if not keep:
        raise TableFormatError(f"{path}: every column was dropped")
    columns = []
    for j in keep:
        label = f"{names[j]!r} (index {j})" if header else f"{j}"
        column = _parse_column([row[j] for row in data], label, path, first_line)
        if np.all(column == column[0]):
            raise TableFormatError(
                f"{path}: column {label} is constant ({column[0]:g}); drop it with --drop-columns"
            )
        columns.append(column)
    return np.stack(columns, axis=1)


def load_uci(name, root=None):
    """The features of a UCI data set as a float64 array ``(rows, features)``.

    ``"banknote"`` 1372 x 4 (class dropped), ``"breast"`` (WDBC) 569 x 30 (ID and
    diagnosis dropped), ``"red-wine"`` 1599 x 11 and ``"white-wine"`` 4898 x 11 (quality
    dropped). The file's checksum is verified first.

    :raises DataFileError: if the file is missing or corrupt.
    """
    if name not in UCI_DATASETS:
        raise ValueError(f"unknown UCI data set {name!r}; expected one of {tuple(UCI_DATASETS)}")
    relpath, sep, drop_columns = UCI_DATASETS[name]
    return load_csv(data_file(relpath, root), sep=sep, drop_columns=drop_columns)


def standardize(x):
    """Standardise each column to mean 0 and standard deviation 1 (``ddof=0``).

    Missing values may be given as NaN; they are ignored in the statistics and stay NaN.

    :param numpy.ndarray x: array ``(rows, columns)``.
    :returns: ``(z, mean, std)`` with ``z = (x - mean) / std``; ``mean`` and ``std``
        have shape ``(columns,)``.
    :raises ValueError: if a column is constant (its standard deviation is 0).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"standardize expects a 2-d array, got shape {x.shape}")
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        raise ValueError(f"cannot standardise constant column(s) {constant.tolist()}")
    return (x - mean) / std, mean, std
