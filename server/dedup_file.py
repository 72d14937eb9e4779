"""Duplicate pairs in a file of registrations, without a hub: `fieldreg-hub dedup-file`.

Input is UTF-8 text in one of two shapes:

* JSON: JSON Lines (one registration object per line, as `fieldreg register
  --json` takes them), or one JSON array of objects, or a single object;
* CSV (TSV when the file name ends in ``.tsv``: cells separated by tabs) with
  a header row naming fields by their dotted paths: ``names.given``,
  ``names.family``, ``names.given_original``, ``names.family_original``, ``sex``,
  ``date_of_birth.value``, ``date_of_birth.precision`` (or ``date_of_birth`` as
  ``1987-05-04``, ``1987`` or ``~1987``), ``place_of_birth``, ``phone``,
  ``household.group_id``, ``household.relationship``, and
  ``documents.<n>.type|number|issuing_country`` for the n-th document (or one
  ``documents`` column holding a JSON array). List fields (``nationalities``,
  ``names.aliases``) hold their values separated by ``;`` (``EGY;SDN``).
  Unknown columns are ignored; two columns filling one field (a name twice,
  ``date_of_birth`` beside ``date_of_birth.value``) are refused.

A record's ``id`` column or member names it in the output; without one the
record is named ``line:N``, N its line number as an editor shows it (JSON
Lines, CSV; blank lines count, a byte-order mark does not) or its position (a
JSON array). No id of the file is taken for it: when an id reads
``line:N`` too, the record without one is ``line:N.2``.
Records are matched as they are: any field may be missing and nothing is
validated beyond what matching reads. A line that cannot be read at all (not
JSON, not an object, a repeated id, text with an unpaired surrogate such as
``"\\ud800"``, a malformed ``documents`` cell) is reported with its line
number and skipped; the command fails only when the file itself cannot be read
or no record is left (or, with ``--strict``, on any skipped line).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from schemas.matching import OPERATING_THRESHOLD, candidates, profile, score

__all__ = [
    "CSV_FIELDS",
    "MAX_CELL_CHARS",
    "BadLine",
    "InputError",
    "Pair",
    "Parsed",
    "Record",
    "find_pairs",
    "parse",
    "unflatten",
    "write_pairs",
]

CSV_FIELDS = (
    "id",
    "names.given",
    "names.family",
    "names.given_original",
    "names.family_original",
    "names.aliases",
    "sex",
    "date_of_birth",
    "date_of_birth.value",
    "date_of_birth.precision",
    "nationalities",
    "place_of_birth",
    "phone",
    "documents",
    "household.group_id",
    "household.relationship",
)
"""The CSV columns matching reads (plus ``documents.<n>.type|number|issuing_country``)."""
_LISTS = frozenset({"nationalities", "names.aliases", "languages"})
_MAX_POSITION = 20  # documents.<n>: no one carries twenty documents
MAX_CELL_CHARS = 16 * 1024 * 1024
"""The longest CSV cell read (a photo or scanned document as base64 fits);
Python's default, 131,072, refused a whole file for one such cell."""
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # not U+2028 and the like: JSON text may hold them


class InputError(ValueError):
    """The input as a whole cannot be read; nothing was written."""


@dataclass(frozen=True, slots=True)
class Record:
    """One readable input record: its id, where it was, and the registration document."""

    id: str
    line: int
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadLine:
    """An input record that could not be read, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Parsed:
    """The readable records of an input, in input order, and the lines skipped."""

    records: list[Record]
    bad: list[BadLine]


@dataclass(frozen=True, slots=True)
class Pair:
    """Two records (the earlier first, by input order) and their match score."""

    id_1: str
    id_2: str
    score: float


def parse(text: str, *, fmt: str = "auto", name: str = "") -> Parsed:
    """Read JSON (Lines, an array, one object) or CSV (`fmt` "json" or "csv"; "auto"
    picks by `name`'s extension, then by the first character). A `name` ending
    in ``.tsv`` is CSV separated by tabs.

    Returns every readable record and every skipped line; raises `InputError`
    when the input as a whole cannot be read.
    """
    if fmt not in ("auto", "json", "csv"):
        raise InputError(f"unknown format {fmt!r}: use auto, json or csv")
    body = text.removeprefix("\ufeff")  # not a line: line 1 starts after it
    stripped = body.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise InputError("no records: the input is empty")
    if fmt == "auto":
        lower = name.lower()
        fmt = "csv" if lower.endswith((".csv", ".tsv")) else "json"
        if not lower.endswith((".csv", ".tsv", ".json", ".jsonl", ".ndjson")):
            fmt = "json" if stripped[0] in "{[" else "csv"
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    if fmt == "json":
        items = _json_items(body, first=stripped[0])
    else:
        items = _csv_items(body.lstrip("\ufeff"), delimiter=delimiter)
    may_hold_surrogates = fmt == "json" and "\\u" in body  # only JSON escapes make them
    readable: list[tuple[int, dict[str, Any]]] = []
    bad: list[BadLine] = []
    for line, item in items:
        if isinstance(item, BadLine):
            bad.append(item)
        elif not isinstance(item, dict):
            bad.append(BadLine(line, f"expected a JSON object, got {type(item).__name__}"))
        elif not isinstance(item.get("id", ""), str | int) or isinstance(item.get("id"), bool):
            bad.append(BadLine(line, "id must be a string or a number"))
        elif may_hold_surrogates and (where := _unpaired_surrogate(item)) is not None:
            bad.append(BadLine(line, f"{where}: text with an unpaired surrogate (not Unicode)"))
        else:
            readable.append((line, item))
    records, repeated = _named(readable)
    return Parsed(records, sorted(bad + repeated, key=lambda b: b.line))


def _named(readable: list[tuple[int, dict[str, Any]]]) -> tuple[list[Record], list[BadLine]]:
    """Records named by their id, or `line:N` when they have none; a repeated id
    is a bad line (the first keeps it)."""
    own = {str(item.get("id", "")).strip() for _, item in readable}
    records: list[Record] = []
    repeated: list[BadLine] = []
    seen: dict[str, int] = {}
    for line, item in readable:
        ident = str(item.get("id", "")).strip()
        if not ident:
            ident, copy = f"line:{line}", 1
            while ident in own:  # an id of the file's own reads the same: ends by len(own)
                copy += 1
                ident = f"line:{line}.{copy}"
        elif ident in seen:
            repeated.append(BadLine(line, f"id {ident!r} already used on line {seen[ident]}"))
            continue
        seen[ident] = line
        records.append(Record(ident, line, item))
    return records, repeated


def _unpaired_surrogate(item: dict[str, Any]) -> str | None:
    """The dotted path of the first text in `item` holding an unpaired surrogate
    (which `json` decodes from an escape such as "\\ud800"), or None."""
    todo: list[tuple[str, Any]] = [("", item)]
    while todo:  # not recursive: nesting may be as deep as json.loads allows
        path, value = todo.pop()
        if isinstance(value, str):
            if any("\ud800" <= char <= "\udfff" for char in value):
                return path or "a value"
        elif isinstance(value, dict):
            for key, child in value.items():
                if any("\ud800" <= char <= "\udfff" for char in key):
                    return f"{path}.{key!r}".lstrip(".")
                todo.append((f"{path}.{key}".lstrip("."), child))
        elif isinstance(value, list):
            todo.extend((f"{path}.{i}".lstrip("."), child) for i, child in enumerate(value))
    return None


_TOO_DEEP = "nested too deeply (more than Python's recursion limit)"


def _json_items(text: str, *, first: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of `text` whose first non-blank character is `first`."""
    if first == "[":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"not valid JSON: {exc}") from None
        except RecursionError:
            raise InputError(f"not readable JSON: {_TOO_DEEP}") from None
        yield from enumerate(data if isinstance(data, list) else [data], start=1)
        return
    try:
        value = json.loads(text)  # one object, possibly over several lines
    except (ValueError, RecursionError):
        pass
    else:
        blank = text[: len(text) - len(text.lstrip())]
        yield 1 + len(_LINE_BREAK.findall(blank)), value
        return
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                yield number, BadLine(number, f"not valid JSON: {reason}")
            except RecursionError:
                yield number, BadLine(number, f"not readable JSON: {_TOO_DEEP}")


def _csv_items(text: str, *, delimiter: str = ",") -> Iterator[tuple[int, Any]]:
    # Process-wide, and only ever raised: no other reader wants fewer.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_CELL_CHARS))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = [column.strip() for column in next(reader)]
        if not any(c in CSV_FIELDS or c.startswith("documents.") for c in header):
            raise InputError(
                f"no known column in the CSV header (expected some of {', '.join(CSV_FIELDS)})"
            )
        _check_columns(header)
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                yield line, BadLine(line, f"{len(row)} cells, but the header has {len(header)}")
                continue
            try:
                yield line, unflatten(dict(zip(header, row, strict=False)))
            except ValueError as exc:
                yield line, BadLine(line, str(exc))
    except csv.Error as exc:
        raise InputError(f"line {reader.line_num}: not valid CSV: {exc}") from None


def _check_columns(header: list[str]) -> None:
    """Refuse a header where two columns fill the same field (the same name
    twice, or `date_of_birth` beside `date_of_birth.value`): which one wins
    would depend on their order."""
    named = [column for column in header if column]
    for i, column in enumerate(named):
        for other in named[i + 1 :]:
            if other == column:
                raise InputError(f"the CSV header names column {column!r} twice: keep one")
            if other.startswith(column + ".") or column.startswith(other + "."):
                first, second = sorted((column, other), key=len)
                raise InputError(
                    f"columns {first!r} and {second!r} both fill {first}: keep one of them"
                )


def unflatten(row: Mapping[str, str]) -> dict[str, Any]:
    """Turn a CSV row with dotted column names into a nested registration document.

    Empty cells are left out; `_LISTS` columns split on ``;``; numeric path parts
    index lists (``documents.0.number``); a ``documents`` cell may hold a JSON array.
    Raises ValueError for a ``documents`` cell that is not a JSON array.
    """
    doc: dict[str, Any] = {}
    for column, raw in row.items():
        value: Any = raw.strip() if isinstance(raw, str) else ""
        if not column or not value:
            continue
        if column in _LISTS:
            value = [part.strip() for part in value.split(";") if part.strip()]
        elif column == "documents":
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                value = None
            if not isinstance(value, list):
                raise ValueError("documents: expected a JSON array of documents")
        _put(doc, column.split("."), value)
    return doc


def _put(doc: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = doc
    for depth, part in enumerate(path):
        key: str | int = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= _MAX_POSITION:
                raise ValueError(f"{'.'.join(path)}: {part!r} is not a position below 20")
            key = int(part)
            node.extend(None for _ in range(key + 1 - len(node)))
        elif not isinstance(node, dict):
            raise ValueError(f"column {'.'.join(path)} clashes with {'.'.join(path[:depth])}")
        target: Any = node  # a list indexed by int or a dict by str, as checked above
        if depth == len(path) - 1:
            target[key] = value
            return
        child = target[key] if isinstance(node, list) or key in node else None
        if child is None:
            child = target[key] = [] if path[depth + 1].isdigit() else {}
        node = child


def find_pairs(
    records: Sequence[Record],
    *,
    threshold: float = OPERATING_THRESHOLD,
    progress: Callable[[int], None] | None = None,
) -> list[Pair]:
    """Block every record by `record_keys`, score each candidate pair once (names
    weighed by how many records of this file carry them) and return the pairs at
    or above `threshold`, best first. Calls `progress(n)` after each n records."""
    profiles = [profile(record.doc) for record in records]
    index: dict[str, list[str]] = defaultdict(list)
    for position, p in enumerate(profiles):
        for key in p.keys:
            index[key].append(str(position))
    counts = {key: len(ids) for key, ids in index.items()}
    pairs: list[tuple[float, int, int]] = []
    for position, p in enumerate(profiles):
        for other in sorted(int(x) for x in candidates(p.keys, index)):
            if other < position:
                value = score(profiles[other], p, key_counts=counts).score
                if value >= threshold:
                    pairs.append((value, other, position))
        if progress is not None:
            progress(1)
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [Pair(records[a].id, records[b].id, value) for value, a, b in pairs]


def write_pairs(pairs: Sequence[Pair], out: TextIO) -> None:
    """Write ``id_1,id_2,score`` CSV (score with 4 decimals) to `out`."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id_1", "id_2", "score"])
    writer.writerows((pair.id_1, pair.id_2, f"{pair.score:.4f}") for pair in pairs)
