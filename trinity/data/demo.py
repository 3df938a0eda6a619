"""The built-in demo corpus: documents made on the spot from what every Python install has.

Three corpora, none downloaded (PAPER.md 5 shrunk to a laptop):

- `stdlib_code`: each source file of the standard library is one document (tests, `site-packages`
  and caches excluded). About 700 files / 12 MB on CPython 3.11.
- `stdlib_docs`: prose. One document per stdlib module: its module docstring followed by the
  signature and docstring of every documented class, function and method, in source order.
  Built by parsing the source with `ast` (nothing is imported, no side effects).
- `math`: endless worksheets of arithmetic and algebra problems with worked solutions and exact
  answers (see `trinity.data.mathgen`).

Order is deterministic for a given seed and Python version: the module list is sorted, then
shuffled with `numpy.random.default_rng(seed)`. Documents keep their natural long-tailed lengths
(a few hundred bytes to ~200 kB for code); math worksheets draw their problem count from a
geometric law for the same reason. Everything streams: one document in memory at a time.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from functools import cache
from itertools import islice
from pathlib import Path

import numpy as np

from trinity.data import mathgen

CORPORA = ("stdlib_code", "stdlib_docs", "math")
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})


@cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's `.py` files (no tests, no third-party packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _shuffled_files(seed: int) -> list[Path]:
    files = list(stdlib_files())
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order]


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _doc_lines(body: list[ast.stmt], prefix: str, out: list[str]) -> None:
    """Append the signature and docstring of each documented class/function in `body` (recursively)."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append(f"class {prefix}{node.name}\n\n{doc}")
            _doc_lines(node.body, f"{prefix}{node.name}.", out)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and not node.name.startswith("_"):
                out.append(f"{prefix}{_signature(node)}\n\n{doc}")


def module_documentation(path: Path) -> str | None:
    """The prose of one module: its docstring and its public docstrings; None if it has none."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return None
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)
    _doc_lines(tree.body, "", parts)
    if not parts:
        return None
    return f"Module {_module_name(path)}\n\n" + "\n\n".join(parts) + "\n"


def iter_stdlib_code(seed: int) -> Iterator[str]:
    """Each stdlib source file, in seed order."""
    for path in _shuffled_files(seed):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def iter_stdlib_docs(seed: int) -> Iterator[str]:
    """Each documented stdlib module's prose, in seed order."""
    for path in _shuffled_files(seed):
        doc = module_documentation(path)
        if doc is not None:
            yield doc


def iter_math(seed: int) -> Iterator[str]:
    """Endless math worksheets: a geometric number of problems (mean 8), each with its worked solution."""
    rng = np.random.default_rng([seed, 0x3A7])
    while True:
        n = int(rng.geometric(1 / 8))
        problems = [mathgen.generate(rng) for _ in range(n)]
        yield "\n\n".join(f"Problem: {p.prompt}\nSolution: {p.solution}" for p in problems) + "\n"


def demo_items(corpus: str, seed: int, start: int = 0) -> Iterator[str | None]:
    """Each item of a demo corpus from item `start` on: its document, or None where it makes none.

    An item is a stdlib file (in seed order; a file with no document is None) or a math worksheet, so
    item k of a stdlib corpus is reached at once, without reading the files before it (the address of a
    demo document in `trinity.data.sources`); math items are generated from the first (skipping costs
    generating them).
    """
    if corpus == "math":
        yield from islice(iter_math(seed), start, None)
        return
    if corpus not in CORPORA:
        raise ValueError(f"unknown demo corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    for path in _shuffled_files(seed)[start:]:
        if corpus == "stdlib_code":
            text = path.read_text(encoding="utf-8", errors="replace")
            yield text if text.strip() else None
        else:
            yield module_documentation(path)


def iter_demo(corpus: str, seed: int = 0, max_documents: int | None = None) -> Iterator[str]:
    """Documents of one demo corpus (`stdlib_code`, `stdlib_docs` or `math`), at most `max_documents`."""
    makers = {"stdlib_code": iter_stdlib_code, "stdlib_docs": iter_stdlib_docs, "math": iter_math}
    if corpus not in makers:
        raise ValueError(f"unknown demo corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    for i, doc in enumerate(makers[corpus](seed)):
        if max_documents is not None and i >= max_documents:
            return
        yield doc
