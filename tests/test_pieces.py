"""engine._windows: how input is cut into windows and windows into pieces.

Pins down: the pieces, in order, are exactly the input rows; each has at most piece_rows
rows; `final` marks exactly the last piece of each window (a window of window_rows rows, or
the whole input for a batch), and a window's last piece may be empty when the input ends
on a piece boundary; progress is cumulative over the window, so the final piece carries
the window's offsets."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from settle_arrow.engine import _windows
from settle_arrow.io.files import discover


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("pieces")
    paths = []
    for i, n in enumerate((37, 0, 64)):
        path = out / f"trades-{i}.parquet"
        pq.write_table(pa.table({"trade_id": pa.array(range(1000 * i, 1000 * i + n), pa.int64())}), path,
                       row_group_size=10)
        paths.append(str(path))
    return discover(paths)


@settings(max_examples=60, deadline=None)
@given(window=st.one_of(st.none(), st.integers(1, 120)), piece=st.integers(1, 50))
def test_pieces_cover_the_input_and_end_windows(files, window, piece):
    pieces = list(_windows(files, {}, window, piece_rows=piece))
    ids = [i for p in pieces for i in p.frame["trade_id"].to_list()]
    assert ids == list(range(37)) + list(range(2000, 2064))
    assert all(p.frame.height <= piece for p in pieces)
    assert pieces[-1].final
    sizes, rows = [], 0  # rows per window from the final flags
    for p in pieces:
        rows += p.frame.height
        if p.final:
            sizes.append(rows)
            rows = 0
    total = 101
    expect = [total] if window is None else [window] * (total // window) + ([total % window] if total % window else [])
    assert sizes == expect
    last = pieces[-1]
    assert (last.last_source, last.last_offset) == (files[-1].url, 64)
    assert {o.source: o.rows_done for o in last.progress}[files[-1].url] == 64
    # Every file appears in the progress of the window that read it, the empty one included.
    seen = {o.source for p in pieces if p.final for o in p.progress}
    assert seen == {f.url for f in files}
