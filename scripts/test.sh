#!/usr/bin/env bash
# Runs the test suite from nothing: Debian packages, .venv, unionfs with its Cython extension,
# then `python -m pytest tests -v` with any extra arguments passed through. Needs root.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
require_root "$@"
cd "$UNIONFS_TOP"
setup_all

# The Cython twin is built above, so its tests must run, not skip.
if [ -z "${UNIONFS_NO_EXT:-}" ] || [ "${UNIONFS_NO_EXT}" = 0 ]; then
    export UNIONFS_REQUIRE_EXT=1
fi

unionfs_mounts() { awk '$3 ~ /^fuse/ && ($1 ~ /union/ || $3 ~ /union/)' /proc/mounts; }
before=$(unionfs_mounts)

# A temporary root of this run's own: pytest's shared /tmp/pytest-of-$USER may hold trees of other
# runs that its end-of-run clean-up (a recursive rmtree) cannot remove, and that would fail this run.
# rm -rf removes trees of any depth.
basetemp=$(mktemp -d /tmp/unionfs-tests.XXXXXX)
trap 'rm -rf --one-file-system "$basetemp"' EXIT

say "python -m pytest tests -v $*"
rc=0
"$VENV/bin/python" -m pytest tests -v --basetemp "$basetemp/t" "$@" </dev/null || rc=$?
if [ "$rc" -eq 5 ]; then
    die "pytest collected no tests (exit 5): that is a failure, not a pass"
fi
left=$(comm -13 <(echo "$before" | sort) <(unionfs_mounts | sort))
[ -z "$left" ] || printf 'warning: unionfs mounts left behind by the tests:\n%s\n' "$left" >&2
exit "$rc"
