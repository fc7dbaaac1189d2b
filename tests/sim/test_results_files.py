"""Results files: written atomically, readable like any file the user writes."""

import os
import stat

import pandas as pd

from sim.core.results import FILE_MODE, frame, write_table


def test_tables_get_the_usual_file_mode_not_owner_only(tmp_path):
    path = tmp_path / "metrics.parquet"
    write_table(frame("metrics", []), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == FILE_MODE
    assert pd.read_parquet(path).empty
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.parquet"]  # no temporary left behind
