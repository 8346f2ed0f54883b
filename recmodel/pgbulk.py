"""Bulk transfer between Postgres and columnar arrays, without a Python step per row.

Reading: `COPY (query) TO STDOUT` in text format. psycopg 3 hands COPY data to Python one row
at a time (about 0.6 s per million rows of interpreter work before any parsing), so the copy
runs through psycopg2's `copy_expert`, whose per-row loop is C, into an OS pipe; a second thread
parses the other end with Arrow's multi-threaded CSV reader. Memory is bounded by the pipe and
Arrow's block size however many rows the query returns.

Writing: binary `COPY FROM STDIN`, with every row laid out by numpy as one fixed-size record
(big-endian fields with their length words), so a million rows are a single `tobytes()`.
"""

from __future__ import annotations

import calendar
import os
import re
import threading
from datetime import datetime
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recmodel import db

READ_BLOCK_BYTES = 4 << 20  # Arrow parses the stream in blocks of this size
PIPE_BUFFER_BYTES = 1 << 20
TEXT_NULL = "\\N"
# COPY TO's text format escapes only these (it never emits octal or hex escapes).
COPY_TEXT_ESCAPES = {"\\\\": "\\", "\\b": "\b", "\\f": "\f", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\v": "\v"}
COPY_TEXT_ESCAPE = re.compile(r"\\[\\bfnrtv]")

BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
BINARY_TRAILER = (-1).to_bytes(2, "big", signed=True)
POSTGRES_EPOCH_UNIX = 946_684_800  # 2000-01-01 UTC in Unix seconds
BINARY_FIELDS = {"int8": ">i8", "int4": ">i4", "float4": ">f4", "float8": ">f8"}
WRITE_CHUNK_ROWS = 1 << 20  # rows encoded per COPY write: bounds the encoder's memory


class BulkCopyError(RuntimeError):
    """A bulk read or write could not complete; nothing partial is returned."""


def read_batches(url: str, query: str, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Stream the rows of `query` (a complete SELECT, literals already bound) as Arrow batches.

    Columns arrive in `schema` order with its types; timestamps are read in UTC.
    """
    import psycopg2

    try:
        conn = psycopg2.connect(db.libpq_url(url), options="-c TimeZone=UTC", connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise db.connection_failure(url, exc) from None
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_fd, "wb", buffering=PIPE_BUFFER_BYTES) as sink:
                conn.cursor().copy_expert(f"COPY ({query}) TO STDOUT", sink)
        except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which raises it
            failure.append(error)

    producer = threading.Thread(target=produce, name="copy-to-pipe", daemon=True)
    producer.start()
    try:
        with open(read_fd, "rb") as source:
            if source.peek(1):  # no bytes means no rows (and Arrow refuses an empty stream)
                reader = pacsv.open_csv(
                    source,
                    read_options=pacsv.ReadOptions(column_names=schema.names, block_size=READ_BLOCK_BYTES),
                    parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False),
                    convert_options=pacsv.ConvertOptions(column_types=schema, null_values=[TEXT_NULL],
                                                         strings_can_be_null=True, true_values=["t"],
                                                         false_values=["f"]))
                for batch in reader:
                    yield _unescape_strings(batch)
        producer.join()
        if failure:
            raise BulkCopyError(f"COPY failed: {failure[0]}") from failure[0]
    except pa.ArrowInvalid as error:
        raise BulkCopyError(f"COPY output does not match the columns {schema.names}: {error}") from error
    finally:
        producer.join()  # the read end is closed by now, so a producer still writing gets EPIPE and stops
        conn.close()


def _unescape_strings(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Undo COPY's backslash escapes in string columns (only rows that contain a backslash pay)."""
    columns = list(batch.columns)
    for i, field in enumerate(batch.schema):
        if not pa.types.is_string(field.type):
            continue
        escaped = pc.fill_null(pc.match_substring(columns[i], "\\"), False)
        if pc.any(escaped).as_py():
            values = columns[i].to_pylist()
            for row in np.flatnonzero(escaped.to_numpy(zero_copy_only=False)):
                values[row] = COPY_TEXT_ESCAPE.sub(lambda m: COPY_TEXT_ESCAPES[m.group(0)], values[row])
            columns[i] = pa.array(values, type=field.type)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def binary_copy_stream(columns: Sequence[tuple[str, object]], rows: int,
                       chunk_rows: int = WRITE_CHUNK_ROWS) -> Iterator[bytes]:
    """A binary COPY stream (header, rows in chunks, trailer) for `rows` rows of fixed-width fields.

    `columns` is (Postgres type, values) in table order: values is an array of `rows` entries or
    one value repeated on every row. int8/int4/float4/float8 take either; text and timestamptz
    take one value only (text is then fixed-width too). There is no NULL: columns are complete.
    """
    layout, values = _binary_layout(columns)
    for i, value in enumerate(values):
        if isinstance(value, np.ndarray) and len(value) != rows:
            raise BulkCopyError(f"column {i} has {len(value)} values for {rows} rows")
    yield BINARY_HEADER
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        records = np.empty(stop - start, dtype=layout)
        records["count"] = len(values)
        for i, value in enumerate(values):
            records[f"len{i}"] = layout[f"f{i}"].itemsize
            records[f"f{i}"] = value[start:stop] if isinstance(value, np.ndarray) else value
        yield records.tobytes()
    yield BINARY_TRAILER


def _binary_layout(columns: Sequence[tuple[str, object]]) -> tuple[np.dtype, list[object]]:
    """The numpy record type of one COPY row and each field's value(s) in wire form."""
    fields: list[tuple[str, str]] = [("count", ">i2")]
    values: list[object] = []
    for i, (pg_type, column) in enumerate(columns):
        if pg_type == "text":
            if not isinstance(column, str) or not column:
                raise BulkCopyError(f"column {i}: text must be one non-empty string for every row, got {column!r}")
            value: object = column.encode()
            kind = f"S{len(value)}"
        elif pg_type == "timestamptz":
            value, kind = _postgres_microseconds(column), ">i8"
        elif pg_type in BINARY_FIELDS:
            value, kind = (np.asarray(column) if np.ndim(column) else column), BINARY_FIELDS[pg_type]
        else:
            raise BulkCopyError(f"column {i}: no binary layout for Postgres type {pg_type!r}")
        fields += [(f"len{i}", ">i4"), (f"f{i}", kind)]
        values.append(value)
    return np.dtype(fields), values


def _postgres_microseconds(value: object) -> int:
    """timestamptz on the wire: microseconds since 2000-01-01 UTC (one value for every row)."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise BulkCopyError(f"timestamptz must be one timezone-aware datetime for every row, got {value!r}")
    # timegm on the UTC time tuple is exact for any datetime subclass (Airflow hands over pendulum's)
    return (calendar.timegm(value.utctimetuple()) - POSTGRES_EPOCH_UNIX) * 1_000_000 + value.microsecond
