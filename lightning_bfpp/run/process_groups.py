"""Process groups end before the interpreter does, and are created once per process for each set of ranks.

A gloo process group runs its collectives on worker threads. A worker drops its reference to a finished operation a
moment after the caller's ``wait()`` returned; when that reference is the last one, the operation's tensors are freed
on the worker, which takes the GIL to release their Python objects. If the main thread has meanwhile reached
interpreter finalization, Python ends the worker inside that (``noexcept``) destructor and the process aborts with
``terminate called without an active exception`` (SIGABRT) after a successful run. Destroying the process groups
while the interpreter is still whole (an ``atexit`` hook) joins their worker threads first.

Groups live until then, so a process that runs several fits (a sweep, ``fit`` then another ``Trainer``) reuses the
groups of an earlier fit with the same ranks (:func:`subgroups_by_enumeration`) instead of adding new ones each time
(on gloo each holds threads and sockets, on NCCL a communicator's device memory).
"""

from __future__ import annotations

import atexit
import gc
import weakref
from datetime import timedelta
from typing import Protocol

import torch.distributed as dist


class ProcessGroupOwner(Protocol):
    """Holds process groups: drops its references when asked; ``failed`` if a run ended with an exception."""

    failed: bool

    def release_process_groups(self) -> None: ...


_owners: weakref.WeakSet[ProcessGroupOwner] = weakref.WeakSet()
_hook_registered = False
_subgroups: dict[tuple[tuple[tuple[int, ...], ...], timedelta], dist.ProcessGroup | None] = {}
_subgroups_world: list[dist.ProcessGroup] = []  # the default group the cached groups split


def subgroups_by_enumeration(ranks: list[list[int]], timeout: timedelta) -> dist.ProcessGroup | None:
    """This rank's group of ``dist.new_subgroups_by_enumeration(ranks, timeout=timeout)`` (None if it is in none),
    created on the first call for these ranks and timeout and reused by later ones while the default group is the
    same. Every rank calls it with the same arguments in the same order (as ``new_subgroups_by_enumeration``)."""
    world = dist.group.WORLD
    if not _subgroups_world or _subgroups_world[0] is not world:
        _subgroups.clear()
        _subgroups_world[:] = [world]  # type: ignore[list-item]
    key = (tuple(tuple(r) for r in ranks), timeout)
    if key not in _subgroups:
        _subgroups[key], _ = dist.new_subgroups_by_enumeration(ranks, timeout=timeout)
    return _subgroups[key]


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
    _subgroups.clear()
    _subgroups_world.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
