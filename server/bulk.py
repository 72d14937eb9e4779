"""Writing many rows at once, and reading rows by many ids, through the driver,
on SQLite and PostgreSQL alike.

SQLAlchemy's per-row parameter handling costs more than the database's own
work when a push writes thousands of rows; these helpers pass positional
tuples straight to the driver's `executemany`. Column types that convert
values on the way in (date-times) still do: their bind processors run here.
Compiling an `IN` of hundreds of bound ids is likewise a millisecond a batch;
`rows_in` writes the placeholders itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

__all__ = ["IN_CHUNK", "chunks", "insert_rows", "mark", "rows_in", "update_rows"]

IN_CHUNK = 500  # ids per IN (...): well inside SQLite's and PostgreSQL's limits


def chunks(items: Iterable[str]) -> Iterator[list[str]]:
    """The distinct `items`, sorted, in lists of at most `IN_CHUNK` (for `IN (...)`)."""
    wanted = sorted(set(items))
    for start in range(0, len(wanted), IN_CHUNK):
        yield wanted[start : start + IN_CHUNK]


def _marks(conn: sa.Connection, count: int) -> list[str]:
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    return [mark] * count


def _processed(
    conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> Sequence[tuple[Any, ...]]:
    processors: list[tuple[int, Callable[[Any], Any]]] = []
    for index, name in enumerate(columns):
        processor = table.c[name].type.bind_processor(conn.dialect)
        if processor is not None:
            processors.append((index, processor))
    if not processors:
        return rows
    # Many rows share one value object (the transaction's `now`): convert each once.
    done: dict[tuple[int, int], Any] = {}
    out = []
    for row in rows:
        values = list(row)
        for index, process in processors:
            value = values[index]
            key = (index, id(value))
            if key not in done:
                done[key] = process(value)
            values[index] = done[key]
        out.append(tuple(values))
    return out


def insert_rows(
    conn: sa.Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """INSERT `rows` (tuples in the order of `columns`) into `table` in one executemany."""
    if not rows:
        return
    names = ", ".join(columns)
    marks = ", ".join(_marks(conn, len(columns)))
    conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({names}) VALUES ({marks})",
        list(_processed(conn, table, columns, rows)),
    )


def update_rows(
    conn: sa.Connection,
    table: sa.Table,
    key: str,
    columns: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
) -> None:
    """UPDATE `table` SET `columns` WHERE `key` = the last value of each row."""
    if not rows:
        return
    marks = _marks(conn, len(columns) + 1)
    assignments = ", ".join(f"{name} = {mark}" for name, mark in zip(columns, marks, strict=False))
    conn.exec_driver_sql(
        f"UPDATE {table.name} SET {assignments} WHERE {key} = {marks[-1]}",
        list(_processed(conn, table, [*columns, key], rows)),
    )


def rows_in(
    conn: sa.Connection, sql: str, ids: Sequence[str], *, before: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Rows (plain tuples) of `sql`, whose `{marks}` stands for the placeholders
    of an IN list, for `ids` in chunks of `IN_CHUNK`; `before` are the values of
    placeholders written before it (`mark(conn)`). Only for columns that need no
    conversion on the way in or out (ids, codes, numbers, bytes).

    On the transaction's own DBAPI cursor: a duplicate check at a hub of a
    million records reads hundreds of candidates this way, and SQLAlchemy's
    result rows cost a tenth of a check more."""
    rows: list[tuple[Any, ...]] = []
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(ids), IN_CHUNK):
            part = ids[start : start + IN_CHUNK]
            marks = ", ".join(_marks(conn, len(part)))
            cursor.execute(sql.format(marks=marks), (*before, *part))
            rows.extend(cursor.fetchall())
    finally:
        cursor.close()
    return rows


def mark(conn: sa.Connection) -> str:
    """The driver's placeholder: `?` on SQLite, `%s` on PostgreSQL."""
    return _marks(conn, 1)[0]
