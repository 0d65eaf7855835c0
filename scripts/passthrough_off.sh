#!/bin/bash
# The filesystem's tests over the Cython build without FUSE passthrough (UNIONFS_PASSTHROUGH=off:
# the daemon serves every read and write, under HANDLE_KILLPRIV_V2 and atomic O_TRUNC), the
# other way the Cython session talks to the kernel. The suite itself runs with passthrough=auto
# (on, as root). Pass pytest's arguments after the script's name to narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export UNIONFS_PASSTHROUGH=off
exec "$PY" -m pytest -q -p no:cacheprovider -k "not python" \
    tests/test_differential.py tests/test_semantics.py tests/test_fsx.py tests/test_killpriv.py \
    tests/test_robust_crash.py tests/test_robust_enospc.py tests/test_robust_concurrency.py \
    tests/test_copyup_concurrency.py tests/test_quota.py "$@"
