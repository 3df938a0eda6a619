"""The micro graph with every post-training stage and eval (tests/graphs/micro-post.yaml), as the text of a
graph file that can be written anywhere: it `use:`s the test graph by its absolute path.

New tests compose it with tests.conftest.compose(path, "micro-post.yaml") instead.
"""

from __future__ import annotations

from tests.conftest import TEST_GRAPHS

POST_GRAPH = f"use: {TEST_GRAPHS / 'micro-post.yaml'}\n"
