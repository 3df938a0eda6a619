#!/usr/bin/env bash
# The test suite as CI runs it: bring up the local Slurm cluster (scripts/slurm-local.sh), then pytest.
# Without a usable cluster the Slurm tests skip, unless TRINITY_REQUIRE_SLURM=1 (CI), where they fail.
# Extra arguments go to pytest (e.g. -k resume, -x). Two tiers, timed on a 2-core CPU:
#   bash scripts/test.sh                   everything, as CI runs it: 1069 tests, about 48 minutes
#   bash scripts/test.sh -m 'not slow'     the quick tier: 981 tests, every subject's fast tests, about 9 minutes
# `slow` (pyproject.toml) marks the end-to-end runs, the multi-rank launches, bf16 training and the Slurm jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
if cluster_env=$(bash scripts/slurm-local.sh up); then
    eval "$cluster_env"
else
    echo "test.sh: the local Slurm cluster did not come up; Slurm tests will skip (or fail if required)" >&2
fi
status=0
python3 -m pytest -q --durations=25 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no test" >&2
fi
exit "$status"
