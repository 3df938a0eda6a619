#!/usr/bin/env bash
# Install trinity and everything its tests need, on a fresh machine of this kind (Debian, Python 3.11).
# torch first, pinned to the CPU build that lies on disk: a plain `torch` requirement would pull a
# multi-GB CUDA build. pyproject's range accepts it, so pip installs nothing more for torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev,hf]"
