"""What the guide's Python examples need is a declared dependency: DuckDB's `.df()` (a pandas DataFrame of a
telemetry query) works in an environment installed from pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]


def test_pandas_is_declared_and_duckdb_df_works() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "pandas" for d in deps), deps
    relation = duckdb.sql("select range as step, range * 0.5 as loss from range(3)")
    assert relation is not None
    frame = relation.df()
    assert frame["loss"].tolist() == [0.0, 0.5, 1.0]
