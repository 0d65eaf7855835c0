#!/bin/sh
# The long form of tests/fs/test_rootless_podman.py: rootless podman with unionmount as its
# mount_program on both builds (CI runs the Cython build's flow only), against podman's native
# rootless overlay and fuse-overlayfs. Run as root (it makes and removes a throwaway user).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
UNIONFS_LONG_TESTS=1 exec "$PY" -m pytest tests/fs/test_rootless_podman.py -q -p no:cacheprovider "$@"
