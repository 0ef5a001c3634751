"""Planning: schedules and their checks, partitions, the cost model, the simulator and the layout search.

Pure Python apart from :mod:`~lightning_bfpp.plan.partition` reading parameter counts: nothing here imports
``torch.distributed`` or Lightning (a lint rule enforces it). The layout search's names are importable from here
(``from lightning_bfpp.plan import plan, ModelSpec``); ``python -m lightning_bfpp.plan`` runs it.
"""

from lightning_bfpp.plan.search import *  # noqa: F403 (the search's public names, listed once there)
from lightning_bfpp.plan.search import __all__ as __all__
