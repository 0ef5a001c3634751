"""``python -m lightning_bfpp.plan``: ranks pipeline layouts (see :mod:`lightning_bfpp.plan.search`)."""

import sys

from lightning_bfpp.plan.search import main

sys.exit(main())
