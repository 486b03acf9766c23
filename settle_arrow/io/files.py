"""Input discovery and streaming reads over fsspec: paths, URLs, globs, directories.

Data model: a user's PATH arguments -> an ordered tuple of `SourceFile(url, fmt, size_bytes,
sha256)` (sha256 of the file's bytes: None from `discover`, filled by `with_sha256` where a
replay records which version of the file it read); each file -> a stream of frames (or
`pa.RecordBatch`es) in file order, starting at a row offset.

Invariants:
  * files of a directory or glob are taken in name order; arguments keep their order.
  * a path that matches nothing, or a file of an unknown extension, is a `SourceError`.
  * CSV is read as text only: typing is the validator's job, so a bad value never aborts
    a read, it becomes a quarantined row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from settle_arrow.errors import UserError

FORMATS = {".parquet": "parquet", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc", ".csv": "csv"}
READ_BATCH_ROWS = 65_536
# Rows of a local Parquet file read_frames decodes at a time: smaller slices cost more per
# row (100,000 trades: 27 ms CPU in slices of 65,536 rows, 14.6 ms in slices of 262,144).
PARQUET_SLICE_ROWS = 262_144
HASH_CHUNK_BYTES = 1 << 22
# Files hashed at once: hashlib and file reads release the GIL, so two threads keep both
# cores busy (5 M trades, 87 MB in five files: ~40 ms, ~70 ms of CPU; sha256 ~1.8 GB/s here).
HASH_THREADS = 2


# A file that is not what its extension says (garbage, not UTF-8, broken CSV) fails with these.
_READ_ERRORS = (pa.ArrowInvalid, OSError, UnicodeDecodeError, csv.Error)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class SourceError(UserError):
    """An input path cannot be found or read (user mistake)."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    url: str
    fmt: str
    size_bytes: int
    sha256: str | None = None


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def discover(paths: list[str] | tuple[str, ...]) -> tuple[SourceFile, ...]:
    """Expand PATH arguments into data files, in the order SPEC §3 defines as 'earlier'."""
    found: list[SourceFile] = []
    for arg in paths:
        try:
            fs, _, stripped = fsspec.get_fs_token_paths(arg)
        except (ValueError, ImportError) as exc:
            raise SourceError(f"cannot open {arg}: {exc}") from None
        candidates: list[str] = []
        for p in stripped or []:
            if fs.isdir(p):
                candidates += sorted(f for f in fs.find(p) if _format_of(f))
            elif fs.exists(p):
                candidates.append(p)
        if not candidates:
            raise SourceError(f"no input file matches {arg}")
        for p in sorted(candidates) if any(c in arg for c in "*?[") else candidates:
            fmt = _format_of(p)
            if fmt is None:
                raise SourceError(
                    f"{arg}: unknown file type {p.rsplit('/', 1)[-1]} "
                    f"(expected one of {', '.join(FORMATS)})"
                )
            found.append(SourceFile(_unstrip(fs, p), fmt, int(fs.size(p) or 0)))
    urls = [f.url for f in found]
    dupes = {u for u in urls if urls.count(u) > 1}
    if dupes:
        raise SourceError(f"input file given twice: {sorted(dupes)[0]}")
    return tuple(found)


def file_sha256(url: str) -> str:
    """sha256 of the bytes of the file at `url` (hex)."""
    h = hashlib.sha256()
    try:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                h.update(chunk)
    except OSError as exc:
        raise SourceError(f"cannot read {url}: {_first_line(exc)}") from None
    return h.hexdigest()


def with_sha256(sources: tuple[SourceFile, ...]) -> tuple[SourceFile, ...]:
    """`sources` with the sha256 of each file's bytes: a replay records it beside the rows
    it has read, so a resume can tell the same file from another one of the same size."""
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="settle-hash") as pool:
        digests = list(pool.map(file_sha256, [s.url for s in sources]))
    return tuple(dataclasses.replace(s, sha256=d) for s, d in zip(sources, digests, strict=True))


def _csv_header(handle) -> list[str]:
    names = next(csv.reader([handle.readline().decode("utf-8-sig")]), [])
    handle.seek(0)
    return names


def _csv_batches(handle, batch_rows: int) -> Iterator[pa.RecordBatch]:
    # Every column is forced to text, which needs the names from the header first.
    names = _csv_header(handle)
    reader = pacsv.open_csv(
        handle,
        read_options=pacsv.ReadOptions(block_size=1 << 22),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            # Only an empty field is null: 'NA', 'NULL', 'N/A'... stay text, as written.
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    for batch in reader:
        yield from (batch.slice(i, batch_rows) for i in range(0, batch.num_rows, batch_rows))


def read_batches(src: SourceFile, start_row: int = 0, batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of `src` from row `start_row` on, each at most `batch_rows` long."""
    assert start_row >= 0 and batch_rows > 0
    try:
        with fsspec.open(src.url, "rb") as handle:
            if src.fmt == "parquet":
                pf = pq.ParquetFile(handle)
                # Whole row groups before the resume point are skipped unread; every group
                # from the one holding it on is read, however small (a short last group
                # must not count as skipped rows).
                skip, groups = start_row, []
                for i in range(pf.num_row_groups):
                    n = pf.metadata.row_group(i).num_rows
                    if not groups and skip >= n:
                        skip -= n
                    else:
                        groups.append(i)
                batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups) if groups else iter(())
            elif src.fmt == "ipc":
                batches = _ipc_batches(handle)
                skip = start_row
            else:
                batches = _csv_batches(handle, batch_rows)
                skip = start_row
            for batch in batches:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                if skip:
                    batch, skip = batch.slice(skip), 0
                for i in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(i, batch_rows)
    except _READ_ERRORS as exc:
        raise SourceError(f"cannot read {src.url}: {_first_line(exc)}") from None


def read_frames(src: SourceFile, columns: list[str], start_row: int = 0) -> Iterator[pl.DataFrame]:
    """Frames of `src`'s `columns` (those it has) from row `start_row` on, in file order.

    A local Parquet file whose columns Polars reads with the types pyarrow gives them is
    read by Polars in slices of PARQUET_SLICE_ROWS: its decoder builds Polars' strings
    directly, where pyarrow's batches are decoded and then converted (measured, 100,000
    trades: 14.6 against 52 + 11 ms of CPU). Anything else takes read_batches."""
    assert start_row >= 0
    path = _local_path(src.url) if src.fmt == "parquet" else None
    try:
        if path is not None:
            parquet = pq.ParquetFile(path)
            arrow = parquet.schema_arrow
            present = [c for c in columns if c in arrow.names]
            # The file's own name, brackets and stars included (discover expanded the user's
            # patterns already), and its own columns only, whatever directories it sits in.
            lazy = pl.scan_parquet(path, glob=False, hive_partitioning=False).select(present)
            if lazy.collect_schema() == pl.from_arrow(arrow.empty_table().select(present)).schema:
                for at in range(start_row, parquet.metadata.num_rows, PARQUET_SLICE_ROWS):
                    yield lazy.slice(at, PARQUET_SLICE_ROWS).collect()
                return
        for batch in read_batches(src, start_row=start_row):
            frame = pl.from_arrow(pa.Table.from_batches([batch.select([c for c in columns if c in batch.schema.names])]))
            assert isinstance(frame, pl.DataFrame)
            yield frame
    except (*_READ_ERRORS, pl.exceptions.PolarsError) as exc:
        raise SourceError(f"cannot read {src.url}: {_first_line(exc)}") from None


def _local_path(url: str) -> str | None:
    """The path of a local file's URL; None for any other filesystem."""
    fs, path = fsspec.core.url_to_fs(url)
    return path if isinstance(fs, LocalFileSystem) else None


def read_schema(src: SourceFile) -> pa.Schema:
    """Columns of `src` from its header or metadata, without reading rows (CSV: all text)."""
    try:
        with fsspec.open(src.url, "rb") as handle:
            if src.fmt == "parquet":
                return pq.read_schema(handle)
            if src.fmt == "ipc":
                try:
                    return ipc.open_file(handle).schema
                except pa.ArrowInvalid:
                    handle.seek(0)
                    return ipc.open_stream(handle).schema
            return pa.schema([(n, pa.string()) for n in _csv_header(handle)])
    except _READ_ERRORS as exc:
        raise SourceError(f"cannot read {src.url}: {_first_line(exc)}") from None


def _ipc_batches(handle) -> Iterator[pa.RecordBatch]:
    try:
        reader = ipc.open_file(handle)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    except pa.ArrowInvalid:
        handle.seek(0)
        yield from ipc.open_stream(handle)


def read_frame(url: str) -> pl.DataFrame:
    """A whole (small) file as one frame: reference data."""
    fmt = _format_of(url)
    if fmt is None:
        raise SourceError(f"unknown file type: {url}")
    if fmt == "parquet":
        try:
            # Polars' own reader, not batches through pyarrow: 10 M holdings rows load in
            # 0.55 s instead of 1.3 s (measured; the strings are built once, as Polars keeps
            # them); a local file by its path, which Polars maps (0.36 -> 0.25 s).
            path = _local_path(url)
            if path is not None:
                return pl.read_parquet(path, glob=False, hive_partitioning=False)
            with fsspec.open(url, "rb") as handle:
                return pl.read_parquet(handle)
        except (*_READ_ERRORS, pl.exceptions.PolarsError) as exc:
            raise SourceError(f"cannot read {url}: {_first_line(exc)}") from None
    batches = list(read_batches(SourceFile(url, fmt, 0)))
    if batches:
        table = pa.Table.from_batches(batches)
    else:
        with fsspec.open(url, "rb") as handle:
            if fmt == "ipc":
                table = ipc.open_file(handle).schema.empty_table()
            else:
                names = handle.readline().decode("utf-8").strip().split(",")
                table = pa.schema([(n, pa.string()) for n in names if n]).empty_table()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame
