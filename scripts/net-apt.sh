#!/usr/bin/env bash
# The expensive network test alone (the suite runs it too): a Debian rootfs by mmdebstrap (from the machine's
# apt source), then apt-get update && apt-get install in a unionrun container from a repository
# served on the host's side of the bridge (tests/net/test_net_apt.py). Needs root and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
UNIONRUN_APT_TEST=1 exec "${VENV:-.venv}/bin/python" -m pytest tests/net/test_net_apt.py -q "$@"
