"""``python -m unionfs``: the unionmount command (unionfs.fs.cli)."""

import sys

from .fs.cli import main

sys.exit(main())
