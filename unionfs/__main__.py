"""``python -m unionfs``: the unionmount command."""

import sys

from .cli import main

sys.exit(main())
