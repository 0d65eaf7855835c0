"""Selects the hot-path implementation: the Cython build when present, else the pure-Python twin.

Set UNIONFS_PURE_PYTHON=1 to force the pure-Python twin (tests and benchmarks run over both).
"""

import os

if os.environ.get("UNIONFS_PURE_PYTHON", "") not in ("", "0"):
    from ._fast_py import *  # noqa: F401,F403
else:
    try:
        from ._fast_c import *  # noqa: F401,F403
    except ImportError:
        from ._fast_py import *  # noqa: F401,F403
