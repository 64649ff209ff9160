"""Numeric tables: the UCI data sets of the MIWAE protocol, and any CSV file.

:func:`read_table` reads a delimited text file, with or without a header row, into a
:class:`Table`: the numeric columns as float64 with NaN for a missing cell (an empty field or
one of :data:`MISSING_VALUES`), and the file's records as written, so that
:meth:`Table.completed_text` can write the file back with only its missing cells filled.
:func:`load_csv` is the strict form, for complete tables: a missing cell is an error. Both reject
what the missing-data experiments cannot use (non-numeric or infinite values, constant columns,
fewer than ``min_rows`` rows) with a :class:`TableFormatError` naming the file, line and column.
"""

import codecs
import csv
import dataclasses
import io
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

#: Cell texts that mean "missing", compared case-insensitively after stripping blanks: the
#: empty cell, R's and pandas' ``NA``, ``N/A``, ``null``, ``None``, and UCI's ``?``. Any
#: spelling of NaN that ``float`` reads (``nan``, ``NaN``, ``-nan``) is missing too.
MISSING_VALUES = ("", "na", "n/a", "null", "none", "?")


class TableFormatError(ValueError):
    """A table cannot be used as numeric data; the message names the file and column."""


def _is_number(text):
    """Whether ``text`` parses as a float (``nan`` and ``inf`` included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_missing(text, tokens):
    """Whether the stripped cell ``text`` marks a missing value: one of ``tokens`` (lower
    case) or a spelling of NaN."""
    return text.lower() in tokens or (_is_number(text) and text.lower().lstrip("+-") == "nan")


@dataclasses.dataclass
class _Record:
    """One record of the file: its text as written (line terminator included), its fields
    (as ``csv`` reads them, not stripped) and its first line's number."""

    raw: str
    fields: list
    line: int

    @property
    def blank(self):
        """A line with no field but blanks: not a row (kept as written)."""
        return len(self.fields) <= 1 and not "".join(self.fields).strip()


def _read_records(path, sep):
    """Every record of a delimited text file (blank lines included) and whether it starts
    with a UTF-8 byte-order mark."""
    consumed = []

    def lines(f):
        for line in f:
            consumed.append(line)
            yield line

    with open(path, "rb") as f:
        bom = f.read(3) == codecs.BOM_UTF8
    with open(path, newline="", encoding="utf-8-sig") as f:
        records, line = [], 1
        for fields in csv.reader(lines(f), delimiter=sep):
            raw = "".join(consumed)
            consumed.clear()
            records.append(_Record(raw, fields, line))
            line += raw.count("\n") or 1
    return records, bom


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


def _parse_column(cells, label, path, tokens, allow_missing):
    """A column of ``(line, stripped text)`` cells as float64, NaN for a missing cell, or an
    error naming the column and the offending line."""
    column = np.empty(len(cells))
    for i, (line, text) in enumerate(cells):
        if _is_missing(text, tokens):
            if not allow_missing:
                problem = "has a missing cell" if text.lower() in tokens else "is not finite"
                raise TableFormatError(
                    f"{path}: column {label} {problem} (line {line}: {text!r}); a complete table is "
                    "needed here (to fill a table's gaps, run impute without --benchmark)"
                )
            column[i] = np.nan
            continue
        try:
            column[i] = float(text)
        except ValueError:
            extra = f", pass --missing-values {text!r} if that text marks a missing cell," if allow_missing else ""
            raise TableFormatError(
                f"{path}: column {label} is not numeric (line {line}: {text!r}); drop it with "
                f"--drop-columns{extra} or fix the file"
            ) from None
        if not np.isfinite(column[i]):
            raise TableFormatError(f"{path}: column {label} is not finite (line {line}: {text!r}); fix the file")
    observed = column[~np.isnan(column)]
    if observed.size == 0:
        raise TableFormatError(f"{path}: column {label} has no observed value; drop it with --drop-columns")
    if np.all(observed == observed[0]):
        raise TableFormatError(
            f"{path}: column {label} is constant ({observed[0]:g}); drop it with --drop-columns"
        )
    return column


def _format_number(value):
    """A filled-in value as text: the shortest string that reads back as the float64."""
    return repr(float(value))


def _split_fields(body, sep):
    """``body`` (a record without its line terminator) cut into its fields as written, quotes
    and blanks included: at each ``sep`` outside double quotes, as ``csv`` reads it."""
    fields, start, quoted = [], 0, False
    for i, char in enumerate(body):
        if char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            fields.append(body[start:i])
            start = i + 1
    return fields + [body[start:]]


def _replace_fields(record, replacements, sep):
    """``record``'s text with the fields ``{index: text}`` replaced (blanks around a field
    kept) and every other byte as written (a record with a stray quote inside a field, which
    ``csv`` reads as text, is written again by ``csv``)."""
    body = record.raw.rstrip("\r\n")
    fields = _split_fields(body, sep)
    if len(fields) != len(record.fields):  # a quote inside a field, which csv reads as text
        out = io.StringIO()
        csv.writer(out, delimiter=sep, lineterminator=record.raw[len(body):]).writerow(
            [replacements.get(j, field) for j, field in enumerate(record.fields)]
        )
        return out.getvalue()
    for j, text in replacements.items():
        field = fields[j]
        lead = field[: len(field) - len(field.lstrip())]
        trail = field[len(field.rstrip()):] if field.strip() else ""
        fields[j] = lead + text + trail
    return sep.join(fields) + record.raw[len(body):]


@dataclasses.dataclass
class Table:
    """A numeric table read by :func:`read_table`.

    :ivar numpy.ndarray values: the kept columns, float64 ``(rows, columns)``, NaN where a cell
        is missing; rows in the file's order, rows of missing cells only included.
    :ivar list names: every column's name (its index as text when there is no header).
    :ivar list columns: the indices (into ``names``) of the columns in ``values``.
    """

    path: pathlib.Path
    sep: str
    header: bool
    names: list
    columns: list
    values: np.ndarray
    records: list
    bom: bool = False

    @property
    def observed(self):
        """``(rows, columns)`` bool, True where ``values`` holds a cell of the file."""
        return ~np.isnan(self.values)

    @property
    def kept_names(self):
        """The names of the columns of ``values``."""
        return [self.names[j] for j in self.columns]

    def missing_counts(self):
        """``{column name: number of missing cells}`` over the columns of ``values``."""
        return dict(zip(self.kept_names, (~self.observed).sum(0).tolist()))

    def completed_text(self, filled):
        """The file's text with each missing cell replaced by ``filled``'s value (``filled`` has
        ``values``' shape; its other entries are ignored). Every other byte is kept: header,
        dropped columns, observed cells as written (quotes included), blank lines, row order,
        line endings."""
        filled = np.asarray(filled, dtype=np.float64)
        if filled.shape != self.values.shape:
            raise ValueError(f"filled has shape {filled.shape}, the table {self.values.shape}")
        missing = ~self.observed
        if not np.isfinite(filled[missing]).all():
            raise ValueError("a filled-in value is not finite")
        parts, row = [], 0
        header = next(record for record in self.records if not record.blank) if self.header else None
        for record in self.records:
            if record.blank or record is header:
                parts.append(record.raw)
                continue
            holes = np.flatnonzero(missing[row])
            if holes.size:
                replacements = {self.columns[j]: _format_number(filled[row, j]) for j in holes}
                parts.append(_replace_fields(record, replacements, self.sep))
            else:
                parts.append(record.raw)
            row += 1
        return "".join(parts)

    @property
    def encoding(self):
        """The encoding to write the completed file with (the input's byte-order mark kept)."""
        return "utf-8-sig" if self.bom else "utf-8"


def read_table(path, sep=",", drop_columns=None, header=None, min_rows=MIN_ROWS,
               missing_values=(), allow_missing=True):
    """Read a numeric delimited text file as a :class:`Table`.

    A cell is missing when, stripped of blanks, it is empty, one of :data:`MISSING_VALUES` or
    ``missing_values`` (case-insensitive), or a spelling of NaN. A line of blanks only is not a
    row (it is kept as written); a row of empty fields is a row with every cell missing. Fields
    may be quoted. With ``header=None`` the first row is taken as a header when none of its
    fields parses as a number and not all of them are missing cells (so a header such as
    ``"a","b"`` is detected, and a data row with some text fields, or with none observed, is
    not mistaken for one).

    :param path: the file.
    :param str sep: field delimiter.
    :param drop_columns: columns to leave out, by header name or 0-based index
        (negative indices count from the end); they are kept as written by
        :meth:`Table.completed_text`.
    :param bool header: whether the first row is a header; ``None`` detects it.
    :param int min_rows: the fewest data rows accepted (default 10: fewer cannot be
        standardised and split by missingness meaningfully).
    :param missing_values: more cell texts that mean missing (e.g. ``["-999"]``).
    :param bool allow_missing: if False, a missing cell is an error (see :func:`load_csv`).
    :raises TableFormatError: (a ``ValueError``) for ragged rows, a non-numeric or
        infinite value, a missing cell when not ``allow_missing``, a column without an
        observed value or with a constant one (drop it with ``--drop-columns``), or fewer
        than ``min_rows`` rows.
    """
    path = pathlib.Path(path)
    records, bom = _read_records(path, sep)
    rows = [record for record in records if not record.blank]
    if not rows:
        raise TableFormatError(f"{path}: the file has no rows")
    tokens = set(MISSING_VALUES) | {str(text).strip().lower() for text in missing_values}
    first = [field.strip() for field in rows[0].fields]
    if header is None:
        header = not any(_is_number(f) and not _is_missing(f, tokens) for f in first) and not all(
            _is_missing(f, tokens) for f in first
        )
    names = first if header else [str(i) for i in range(len(first))]
    data = rows[1:] if header else rows
    for record in data:
        if len(record.fields) != len(names):
            raise TableFormatError(
                f"{path}: row {record.line} has {len(record.fields)} fields, expected {len(names)} "
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
        cells = [(record.line, record.fields[j].strip()) for record in data]
        columns.append(_parse_column(cells, label, path, tokens, allow_missing))
    return Table(path, sep, header, names, keep, np.stack(columns, axis=1), records, bom)


def load_csv(path, sep=",", drop_columns=None, header=None, min_rows=MIN_ROWS):
    """Read a complete numeric delimited text file as a float64 array ``(rows, columns)``.

    :func:`read_table`'s :attr:`Table.values`, with a missing cell an error: the arguments are
    :func:`read_table`'s.

    :raises TableFormatError: (a ``ValueError``) for ragged rows, a missing, non-numeric or
        non-finite value, a constant column (drop it with ``--drop-columns``), or fewer
        than ``min_rows`` rows.
    """
    return read_table(path, sep, drop_columns, header, min_rows, allow_missing=False).values


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
