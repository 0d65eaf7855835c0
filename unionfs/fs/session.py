"""Selects the session that serves requests: the Cython one when built, else the pure-Python twin.

The same switch as _fast.py: UNIONFS_PURE_PYTHON=1 forces the twin (pyfuse3's trio loop).
"""

import os

if os.environ.get("UNIONFS_PURE_PYTHON", "") not in ("", "0"):
    from ._session_py import IMPLEMENTATION, Runtime, Session  # noqa: F401
else:
    try:
        from ._session_c import IMPLEMENTATION, Runtime, Session  # noqa: F401
    except ImportError:
        from ._session_py import IMPLEMENTATION, Runtime, Session  # noqa: F401
