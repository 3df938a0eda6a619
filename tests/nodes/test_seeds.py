"""Named seed streams: the same in every process, distinct per name and per experiment seed."""

from __future__ import annotations

import os
import subprocess
import sys

from trinity.nodes.seeds import stream_seed

NAMES = ["model/init", "loader/pretrain/phase1", "loader/pretrain/phase2", "loader/extend", "loader/sft"]


def test_a_stream_seed_is_the_closed_form_sha256_value() -> None:
    # the first 8 bytes, little-endian, of sha256(b"0/loader/extend"), top bit cleared
    assert stream_seed(0, "loader/extend") == 6941885370372593615
    assert all(0 <= stream_seed(s, n) < 2**63 for s in (0, 1, 2**40) for n in NAMES)


def test_streams_are_distinct_per_name_and_seed() -> None:
    seeds = {(s, n): stream_seed(s, n) for s in range(20) for n in NAMES}
    assert len(set(seeds.values())) == len(seeds)
    # what arithmetic on seeds got wrong: seed 1's phase 1 was seed 0's phase 1001
    assert stream_seed(1, "loader/pretrain/phase1") != stream_seed(0, "loader/pretrain/phase1001")


def test_streams_do_not_depend_on_the_process_or_its_hash_seed() -> None:
    """Another process, with another str-hash salt than this one (Python's hash() would differ)."""
    code = f"from trinity.nodes.seeds import stream_seed; print([stream_seed(7, n) for n in {NAMES!r}])"
    salt = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": salt}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out == f"{[stream_seed(7, n) for n in NAMES]}\n"
