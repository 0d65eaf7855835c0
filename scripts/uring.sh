#!/bin/bash
# The filesystem's tests over the Cython build with FUSE over io_uring (UNIONFS_URING=on: every
# request and reply through the rings), once with passthrough (auto: on, as root) and once without.
# The kernel offers io_uring only while the fuse module's enable_uring is Y, a setting of the whole
# machine: this sets it for the run and puts the old value back on exit, however the run ends.
# Pass pytest's arguments after the script's name to narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PARAM=/sys/module/fuse/parameters/enable_uring
[ -e "$PARAM" ] || { echo "uring.sh: this kernel has no FUSE over io_uring ($PARAM)" >&2; exit 1; }
old=$(cat "$PARAM")
trap 'echo "$old" > "$PARAM"' EXIT
echo Y > "$PARAM"
export UNIONFS_URING=on
status=0
for pt in auto off; do
    echo "== uring=on, passthrough=$pt"
    UNIONFS_PASSTHROUGH=$pt "$PY" -m pytest -q -p no:cacheprovider -k "not python" \
        tests/fs/test_differential.py tests/fs/test_semantics.py tests/fs/test_fsx.py \
        tests/fs/test_killpriv.py tests/fs/test_passthrough.py tests/fs/test_robust_crash.py \
        tests/fs/test_robust_enospc.py tests/fs/test_robust_concurrency.py \
        tests/fs/test_robust_unmount.py tests/fs/test_copyup_concurrency.py tests/fs/test_quota.py \
        tests/fs/test_podman.py "$@" || status=1
done
exit $status
