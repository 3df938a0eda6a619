"""The demo corpus: no download, deterministic per seed, long-tailed, three different kinds of text."""

from __future__ import annotations

import itertools

import numpy as np

from trinity.data.demo import iter_demo, stdlib_files


def take(corpus: str, n: int, seed: int = 0) -> list[str]:
    return list(itertools.islice(iter_demo(corpus, seed), n))


def test_stdlib_code_is_the_standard_library() -> None:
    files = stdlib_files()
    assert len(files) > 100
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    docs = take("stdlib_code", 30)
    texts = {f.read_text(encoding="utf-8", errors="replace") for f in files}
    assert all(d in texts for d in docs)
    assert sum(("def " in d or "import " in d) for d in docs) >= 25


def test_deterministic_per_seed() -> None:
    for corpus in ("stdlib_code", "stdlib_docs", "math"):
        assert take(corpus, 5, seed=1) == take(corpus, 5, seed=1)
        assert take(corpus, 5, seed=1) != take(corpus, 5, seed=2)


def test_docs_are_prose_from_docstrings() -> None:
    docs = take("stdlib_docs", 20)
    assert all(d.startswith("Module ") for d in docs)
    assert not any(d.lstrip().startswith("import ") for d in docs)


def test_lengths_have_a_long_tail() -> None:
    for corpus, n in (("stdlib_code", 150), ("math", 400)):
        lengths = np.array([len(d) for d in take(corpus, n)])
        assert lengths.max() > 8 * np.median(lengths), corpus


def test_math_is_endless_and_max_documents_stops_it() -> None:
    assert len(take("math", 2000)) == 2000
    assert len(list(iter_demo("math", 0, max_documents=7))) == 7
    assert "Answer:" in take("math", 1)[0]
