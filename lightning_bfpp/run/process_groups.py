"""Process groups end before the interpreter does.

A gloo process group runs its collectives on worker threads. A worker drops its reference to a finished operation a
moment after the caller's ``wait()`` returned; when that reference is the last one, the operation's tensors are freed
on the worker, which takes the GIL to release their Python objects. If the main thread has meanwhile reached
interpreter finalization, Python ends the worker inside that (``noexcept``) destructor and the process aborts with
``terminate called without an active exception`` (SIGABRT) after a successful run. Destroying the process groups
while the interpreter is still whole (an ``atexit`` hook) joins their worker threads first.
"""

from __future__ import annotations

import atexit
import gc
import weakref
from typing import Protocol

import torch.distributed as dist


class ProcessGroupOwner(Protocol):
    """Holds process groups: drops its references when asked; ``failed`` if a run ended with an exception."""

    failed: bool

    def release_process_groups(self) -> None: ...


_owners: weakref.WeakSet[ProcessGroupOwner] = weakref.WeakSet()
_hook_registered = False


def destroy_at_exit(owner: ProcessGroupOwner) -> None:
    """At interpreter exit, ``owner`` drops its process groups and every process group is destroyed, unless a run
    of an owner failed (a collective may then still wait for a lost rank: destroying would wait for it too)."""
    global _hook_registered
    _owners.add(owner)
    if not _hook_registered:
        atexit.register(destroy_process_groups)
        _hook_registered = True


def destroy_process_groups() -> None:
    """Drops the owners' references and destroys every process group; the last references of the groups go here,
    so their destructors join the worker threads while the interpreter can still serve them."""
    owners = list(_owners)
    if any(owner.failed for owner in owners):
        return
    for owner in owners:
        owner.release_process_groups()
    del owners
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
