"""Ranks of ``tests/test_nccl_order_link.py``: three gloo ranks post transfer groups through
:class:`~lightning_bfpp.run.nccl_order_link.NcclOrderLink` in two orders, one that NCCL runs and one that hangs on
NCCL, and write what each rank received (or that it was still waiting after a few seconds) to ``out_dir``."""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_bfpp.run.nccl_order_link import NcclOrderLink
from lightning_bfpp.run.p2p import KIND_ACT, TensorMeta

WAIT_S = 5.0  # a group still running after this long is hung (every transfer here takes milliseconds)
META = [TensorMeta(torch.float32, (4,))]


def value(stage: int) -> torch.Tensor:
    return torch.full((4,), float(stage))


def crossing(link: NcclOrderLink, rank: int) -> dict[int, object]:
    """An order NCCL runs: rank 1's group receives from rank 2 first, then from rank 0; rank 2 sends only after its
    receive from rank 0, which rank 0 posts only after its send to rank 1 has ended. A link that made a send wait for
    the receiver's earlier receives of the same group would hang here."""
    received = {}
    if rank == 0:
        link.send([value(1)], KIND_ACT, 1, 0, peer=1)
        link.issue()
        link.send([value(3)], KIND_ACT, 3, 0, peer=2)
        link.issue()
    elif rank == 1:
        received[2] = link.recv(META, KIND_ACT, 2, 0, peer=2)
        received[1] = link.recv(META, KIND_ACT, 1, 0, peer=0)
        link.issue()
    else:
        received[3] = link.recv(META, KIND_ACT, 3, 0, peer=0)
        link.issue()
        link.send([value(2)], KIND_ACT, 2, 0, peer=1)
        link.issue()
    return received


def receive_first(link: NcclOrderLink, rank: int) -> dict[int, object]:
    """An order that hangs on NCCL: ranks 0 and 1 each receive from the other in a group before the group that
    sends (gloo alone would buffer the sends and pass)."""
    received = {}
    if rank < 2:
        received[10 + rank] = link.recv(META, KIND_ACT, 10 + rank, 0, peer=1 - rank)
        link.issue()
        link.send([value(11 - rank)], KIND_ACT, 11 - rank, 0, peer=1 - rank)
        link.issue()
    return received


def finished(link: NcclOrderLink, received: dict[int, object]) -> dict[str, object]:
    """Waits (in a thread, at most ``WAIT_S``) for every receive and send; the values received, or ``hung``."""
    result: dict[str, object] = {}

    def wait() -> None:
        result["values"] = {stage: pending.wait()[0].tolist() for stage, pending in received.items()}  # type: ignore[attr-defined]
        link.wait_sends()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(WAIT_S)
    return {"hung": waiter.is_alive(), "values": result.get("values")}


def main() -> None:
    out_dir = Path(json.loads(Path(sys.argv[1]).read_text()).get("out_dir", Path(sys.argv[1]).parent))
    rank = int(os.environ["LOCAL_RANK"])
    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    results = {}
    for name, order in (("crossing", crossing), ("receive_first", receive_first)):
        link = NcclOrderLink(dist.group.WORLD, num_micro_batches=1, device=torch.device("cpu"))
        results[name] = finished(link, order(link, rank))
        if results[name]["hung"]:
            break  # the hung ranks' transfers stay posted: nothing after them would be meaningful
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    os._exit(0)  # a hung group's worker thread is blocked inside gloo: do not wait for it at exit


if __name__ == "__main__":
    main()
