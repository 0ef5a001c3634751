"""Every option of the pipeline, once: its description, default and check, and the checks between options.

:class:`PipelineOptions` is what :class:`~lightning_bfpp.BFPPStrategy` reads its options from; the Hydra structured
config (:mod:`lightning_bfpp.config`) and the docs' option table (``docs/reference/options.md``) are generated from
it.
``python -m lightning_bfpp.options --markdown`` prints that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any, Literal

from lightning_bfpp.plan.partition import PARTITIONS
from lightning_bfpp.plan.schedule import SCHEDULES, check_micro_batch_groups
from lightning_bfpp.plan.specs import RANK_LAYOUTS
from lightning_bfpp.run.nonfinite import NONFINITE_POLICIES
from lightning_bfpp.run.recompute import ACTIVATION_CHECKPOINTING
from lightning_bfpp.run.sharding import FSDP_MODES, SHARDING_MODES
from lightning_bfpp.run.weight_grad import WEIGHT_GRADIENTS

DEFAULT_TIMEOUT = timedelta(minutes=30)

# The choices of the options, as types: LightningCLI and Hydra list them and refuse another value when they parse it
# (tests/test_config.py checks that they equal the runtime's names).
ScheduleName = Literal["breadth_first", "depth_first", "gpipe", "1f1b", "LoopedBFS", "Interleaved1F1B", "GPipe", "1F1B"]
PartitionMethod = Literal["uniform", "parameters", "explicit"]
RankLayout = Literal["dp_contiguous", "pp_contiguous"]
ShardingMode = Literal["none", "optimizer", "gradients", "full"]
ActivationCheckpointing = Literal["none", "stage", "layer"]
WeightGradients = Literal["per_micro_batch", "batched"]
NonfiniteLoss = Literal["raise", "skip"]

SCHEDULE_ALIASES = {"LoopedBFS": "breadth_first", "Interleaved1F1B": "depth_first", "GPipe": "gpipe", "1F1B": "1f1b"}
"""torch.distributed.pipelining's names of the schedules (any case), accepted for ``schedule``."""

Check = Callable[[str, Any], Any]
"""Takes an option's name and value; raises ``ValueError`` naming the option, or returns the value to keep."""


def option(default: Any, help: str, check: Check) -> Any:
    """A field of :class:`PipelineOptions`: its default, its description (Markdown) and its check."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("an option's default must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help, "check": check})


# ------------------------------------------------------------------------------------------- per-option checks
def positive(name: str, value: Any) -> int:
    """An integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def optional(check: Check) -> Check:
    """``None``, or what ``check`` accepts."""
    return lambda name, value: None if value is None else check(name, value)


def positive_or_auto(name: str, value: Any) -> int | str:
    """An integer >= 1, or ``"auto"``."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or 'auto', got {value!r}.")
    return value


def one_of(choices: Sequence[str], aliases: dict[str, str] | None = None) -> Check:
    """One of ``choices``, or of ``aliases`` (any case), kept as the choice it names; an ``Enum`` member (Hydra's
    typed choice) by its value."""
    by_alias = {alias.lower(): choice for alias, choice in (aliases or {}).items()}

    def check(name: str, value: Any) -> str:
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, str) and value not in choices:
            value = by_alias.get(value.lower(), value)
        if value not in choices:
            also = f" (or torch's names {', '.join(map(repr, aliases))})" if aliases else ""
            raise ValueError(f"{name}={value!r} is not supported: choose one of {', '.join(map(repr, choices))}{also}.")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def text(name: str, value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}.")
    return value


def layer_indices(name: str, value: Any) -> tuple[int, ...]:
    """A sequence of integers, kept as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of layer indices, got {value!r}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a list of integer layer indices, got {list(value)!r}.")
    return tuple(value)


def seconds(name: str, value: Any) -> timedelta:
    """A positive duration: a ``timedelta`` or a number of seconds, kept as a ``timedelta``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = timedelta(seconds=float(value))  # host number
    if not isinstance(value, timedelta) or value.total_seconds() <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or a timedelta, got {value!r}.")
    return value


def batch_range(name: str, value: Any) -> tuple[int, int]:
    """Two batch indices ``(first, stop)``, ``0 <= first < stop``."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ValueError(f"{name} must be two batch indices (first, stop) with 0 <= first < stop, got {value!r}.")
    return (value[0], value[1])


# --------------------------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class PipelineOptions:
    """The options of :class:`~lightning_bfpp.BFPPStrategy`, checked when created (``ValueError`` naming the
    option and what to change). Sequences are kept as tuples and ``timeout`` as a ``timedelta``."""

    pipeline_parallel_size: int | Literal["auto"] = option(
        "auto", '`P`, the number of pipeline ranks; `"auto"`: every process (`D = 1`)', positive_or_auto
    )
    stages_per_rank: int = option(
        1, "`L`, the number of (non-neighbouring) stages each pipeline rank holds: stage `s` on rank `s % P`", positive
    )
    micro_batches: int | None = option(
        None,
        "`M`, the number of micro-batches each batch is split into (the batch size must be a multiple); `None`: `P`",
        optional(positive),
    )
    schedule: ScheduleName = option(
        "breadth_first",
        "`breadth_first` (looped, any `M`), `depth_first` (interleaved 1F1B; `M % P == 0` when `L > 1`), `gpipe`, "
        "`1f1b` (both `L = 1`); torch's names `LoopedBFS`, `Interleaved1F1B`, `GPipe`, `1F1B` too",
        one_of(tuple(SCHEDULES), SCHEDULE_ALIASES),
    )
    partition: PartitionMethod = option(
        "uniform",
        "layers to stages: `uniform` (equal layer counts), `parameters` (balanced parameter counts), `explicit` "
        "(`partition_boundaries`)",
        one_of(PARTITIONS),
    )
    partition_boundaries: Sequence[int] | None = option(
        None,
        "with `partition=explicit`: `P*L+1` increasing layer indices from 0 to the number of layers; stage `s` holds "
        "layers `[b[s], b[s+1])`",
        optional(layer_indices),
    )
    rank_layout: RankLayout = option(
        "dp_contiguous",
        "`dp_contiguous` (rank = pp_rank * D + dp_rank: the replicas of a stage are neighbours, e.g. on one node) or "
        "`pp_contiguous` (rank = dp_rank * P + pp_rank)",
        one_of(RANK_LAYOUTS),
    )
    sharding: ShardingMode = option(
        "none",
        "data-parallel mode: `none` (gradients averaged), `optimizer` (ZeRO-1), `gradients` (ZeRO-2), `full` "
        "(ZeRO-3); see [Sharded data parallelism](#sharded-data-parallelism)",
        one_of(SHARDING_MODES),
    )
    activation_checkpointing: ActivationCheckpointing = option(
        "none",
        "`none`, `layer` or `stage`: recompute each layer / each stage in backward instead of keeping its "
        "activations (see [Saving activation memory](#saving-activation-memory))",
        one_of(ACTIVATION_CHECKPOINTING),
    )
    breadth_first_micro_batches: int | None = option(
        None,
        "`breadth_first` only: run the micro-batches breadth-first in groups of this many (a divisor of `M`), the "
        "groups one after another; `None`: one group of all `M` (see "
        "[Saving activation memory](#saving-activation-memory))",
        optional(positive),
    )
    weight_gradients: WeightGradients = option(
        "per_micro_batch",
        "`per_micro_batch` or `batched`: each `nn.Linear` computes its weight gradient once per run of its stage's "
        "backwards, over all the run's micro-batches (see [Performance](#performance)); sharding `none` or "
        "`optimizer` only",
        one_of(WEIGHT_GRADIENTS),
    )
    process_group_backend: str | None = option(
        None, "`gloo`, `nccl`, ...; `None`: `gloo` on CPU, `nccl` on GPU", optional(text)
    )
    timeout: timedelta | float = option(
        DEFAULT_TIMEOUT, "timeout of every collective and transfer (`timedelta` or seconds)", seconds
    )
    nonfinite_loss: NonfiniteLoss = option(
        "raise",
        "a NaN/inf loss or gradient on any rank: `raise` (an error on every rank) or `skip` the optimizer step "
        "(every rank)",
        one_of(NONFINITE_POLICIES),
    )
    timeline_dir: str | None = option(
        None,
        "a directory: record when every action runs on every rank during `timeline_batches` and write "
        "`timeline.json` and `timeline.png` there",
        optional(text),
    )
    timeline_batches: tuple[int, int] = option(
        (2, 4), "`(first, stop)`: the training batches `timeline_dir` records", batch_range
    )
    save_distributed_checkpoint: bool = option(
        True,
        "`True`: a checkpoint is a directory in which each rank writes its stages (fast, any layout resumes it); "
        "`False`: rank 0 gathers the whole model and optimizer state into one Lightning checkpoint file, which "
        "`Model.load_from_checkpoint` and one-process runs load too (as `ModelParallelStrategy`'s option)",
        boolean,
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # each option alone, then the options together
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        check_micro_batch_groups(self.schedule, self.micro_batches, self.breadth_first_micro_batches)
        if self.weight_gradients == "batched" and self.sharding in FSDP_MODES:
            raise ValueError(
                f"weight_gradients='batched' does not work with sharding={self.sharding!r}: FSDP reduces a stage's "
                "gradients inside its last backward, before the batched weight gradients exist. Use "
                "sharding='none' or 'optimizer', or weight_gradients='per_micro_batch'."
            )
        if self.partition_boundaries is not None and self.partition != "explicit":
            raise ValueError("partition_boundaries is only used with partition='explicit': set both or neither.")

    @classmethod
    def build(cls, options: PipelineOptions | None = None, **values: Any) -> PipelineOptions:
        """``options`` (default: the defaults) with the options named in ``values`` replaced; an unknown name is
        refused with the list of options."""
        if options is not None and not isinstance(options, PipelineOptions):
            raise TypeError(
                f"options must be a PipelineOptions, got {options!r}: give the options as keyword arguments "
                "(pipeline_parallel_size=2, ...) or as options=PipelineOptions(...)."
            )
        unknown = sorted(set(values) - set(option_names()))
        if unknown:
            raise TypeError(f"Unknown option(s) {', '.join(unknown)}: the options are {', '.join(option_names())}.")
        return dataclasses.replace(options, **values) if options is not None else cls(**values)


def option_names() -> list[str]:
    """The options' names, in the order of :class:`PipelineOptions`."""
    return [f.name for f in dataclasses.fields(PipelineOptions)]


def shown_default(value: Any) -> str:
    """An option's default as the option table and ``--help`` show it."""
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g} s"
    return repr(value).replace("'", '"')


def markdown_table() -> str:
    """The docs' option table (``docs/reference/options.md``; its links are anchors of the docs' guide pages)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(PipelineOptions):
        rows.append(f"| `{f.name}` | `{shown_default(f.default)}` | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def arguments_docstring(indent: str = "    ") -> str:
    """The options as a docstring's ``Arguments:`` entries (reStructuredText literals)."""
    lines = []
    for f in dataclasses.fields(PipelineOptions):
        help_text = re.sub(r"\[([^]]+)\]\(#[^)]+\)", "the docs' section \\1", f.metadata["help"]).replace("`", "``")
        entry = f"{f.name}: {help_text}. Default ``{shown_default(f.default)}``."
        lines.append(textwrap.fill(entry, 120, initial_indent=indent, subsequent_indent=indent + "    "))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The options of BFPPStrategy.")
    parser.add_argument("--markdown", action="store_true", help="print the docs' option table")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
    else:
        for f in dataclasses.fields(PipelineOptions):
            print(f"{f.name} (default {shown_default(f.default)}): {f.metadata['help']}")
    return 0


def option_property(name: str) -> property:
    """A read-only attribute of the strategy giving ``options.<name>``; setting it raises, saying how to set it."""

    def get(strategy: Any) -> Any:
        return getattr(strategy.options, name)

    def refuse(strategy: Any, value: Any) -> None:
        raise AttributeError(
            f"BFPPStrategy's options are fixed when it is created: pass {name}={value!r} to BFPPStrategy(...) "
            f"(Hydra: strategy.{name}=...) instead of setting it afterwards."
        )

    return property(get, refuse, doc=f"``options.{name}`` (set through the constructor).")


if __name__ == "__main__":
    raise SystemExit(main())
