"""The Hydra configuration in ``conf/`` composes, is checked, and maps its groups onto the strategy (in-process)."""

from __future__ import annotations

import dataclasses
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_bfpp import BFPPStrategy
from lightning_bfpp.config import BFPPStrategyConfig
from lightning_bfpp.hydra import (
    ConfigError,
    build_strategy,
    check_config,
    check_pipeline,
    check_single_device,
    resolve_trainer,
)
from lightning_bfpp.options import PipelineOptions, option_names

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "examples"))

from bfpp_examples.config import register_configs  # noqa: E402
from bfpp_examples.convnet import SHAPES, make_shapes  # noqa: E402
from bfpp_examples.gpt import GPT  # noqa: E402
from bfpp_examples.text_data import RandomWindows, TextDataModule, load_tokens  # noqa: E402
from conftest import run_script  # noqa: E402

register_configs()


def compose_cfg(*overrides: str, config: str = "train"):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config, overrides=list(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------------------------ options
BAD_OPTIONS = [  # the options -> what the error must say
    ({"pipeline_parallel_size": 0}, "pipeline_parallel_size must be an integer >= 1 or 'auto', got 0"),
    ({"pipeline_parallel_size": "all"}, "pipeline_parallel_size must be an integer >= 1 or 'auto', got 'all'"),
    ({"stages_per_rank": 1.5}, "stages_per_rank must be an integer >= 1"),
    ({"micro_batches": True}, "micro_batches must be an integer >= 1, got True"),
    ({"schedule": "looped"}, "schedule='looped' is not supported: choose one of 'breadth_first'"),
    ({"partition": "greedy"}, "partition='greedy' is not supported"),
    ({"partition": "explicit", "partition_boundaries": "0,2,4"}, "partition_boundaries must be a list of layer"),
    ({"rank_layout": "dp_first"}, "rank_layout='dp_first' is not supported"),
    ({"sharding": "zero3"}, "sharding='zero3' is not supported"),
    ({"activation_checkpointing": "all"}, "activation_checkpointing='all' is not supported"),
    ({"breadth_first_micro_batches": 0}, "breadth_first_micro_batches must be an integer >= 1"),
    ({"weight_gradients": "rows"}, "weight_gradients='rows' is not supported"),
    ({"process_group_backend": 1}, "process_group_backend must be a string"),
    ({"timeout": -1}, "timeout must be a positive number of seconds"),
    ({"nonfinite_loss": "ignore"}, "nonfinite_loss='ignore' is not supported"),
    ({"timeline_dir": 3}, "timeline_dir must be a string"),
    ({"timeline_batches": (4, 2)}, "timeline_batches must be two batch indices (first, stop) with 0 <= first < stop"),
    ({"save_distributed_checkpoint": "no"}, "save_distributed_checkpoint must be True or False"),
    # options that exclude each other
    ({"micro_batches": 4, "breadth_first_micro_batches": 3}, "breadth_first_micro_batches=3 must divide"),
    ({"schedule": "gpipe", "breadth_first_micro_batches": 2}, "not of schedule='gpipe'"),
    ({"sharding": "gradients", "weight_gradients": "batched"}, "weight_gradients='batched' does not work with"),
    ({"partition_boundaries": [0, 2, 4]}, "partition_boundaries is only used with partition='explicit'"),
]


def test_every_option_has_a_description_and_a_check_that_names_it() -> None:
    """Every option is refused with a message naming it; the table of bad values covers every option."""
    covered = {name for values, _ in BAD_OPTIONS for name in values}
    assert covered == set(option_names())
    for values, message in BAD_OPTIONS:
        for make in (lambda v: PipelineOptions(**v), lambda v: BFPPStrategy(**v)):
            with pytest.raises(ValueError) as error:
                make(values)
            assert message in str(error.value), (values, str(error.value))


def test_options_are_normalized_and_combined() -> None:
    options = PipelineOptions(partition="explicit", partition_boundaries=[0, 2, 4], timeout=60, timeline_batches=[1, 3])
    assert options.partition_boundaries == (0, 2, 4) and options.timeline_batches == (1, 3)
    assert options.timeout == timedelta(seconds=60)
    strategy = BFPPStrategy(options, micro_batches=8)  # keyword arguments replace the given options' values
    assert strategy.options == PipelineOptions(
        partition="explicit", partition_boundaries=(0, 2, 4), timeout=60, timeline_batches=(1, 3), micro_batches=8
    )
    assert (strategy.micro_batches, strategy.partition_method, strategy.partition_boundaries) == (
        8,
        "explicit",
        (0, 2, 4),
    )
    assert BFPPStrategy().options == PipelineOptions()  # Trainer(strategy="bfpp") builds it without arguments
    with pytest.raises(TypeError, match=r"Unknown option\(s\) micro_batch: the options are pipeline_parallel_size, "):
        BFPPStrategy(micro_batch=2)
    with pytest.raises(TypeError, match="give the options as keyword arguments"):
        BFPPStrategy(2)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.micro_batches = 2  # type: ignore[misc]


def test_the_structured_config_holds_every_option_with_its_default() -> None:
    """The Hydra config made from the options instantiates to the strategy with the options' defaults."""
    config = OmegaConf.structured(BFPPStrategyConfig)
    assert list(config) == ["_target_", *option_names()]
    strategy = instantiate(config, _convert_="all")
    assert isinstance(strategy, BFPPStrategy) and strategy.options == PipelineOptions()


# ------------------------------------------------------------------------------------------------------- Hydra
@pytest.mark.parametrize("config", ["train", "train_convnet"])
def test_defaults_compose_and_resolve(config: str) -> None:
    cfg = compose_cfg(config=config)
    check_config(cfg)
    assert cfg.strategy.pipeline_parallel_size == 2 and cfg.strategy.stages_per_rank == 2
    assert cfg.strategy.micro_batches == 4 and cfg.strategy.schedule == "breadth_first"


@pytest.mark.parametrize(
    "group", ["strategy", "schedule", "partition", "sharding", "trainer", "model", "data", "launcher"]
)
def test_every_group_option_composes(group: str) -> None:
    for option in group_options(group):
        if group == "launcher" and option != "local":
            continue  # needs the hydra-submitit-launcher plugin
        extra = ["strategy.partition_boundaries=[0,2,4,6,8]"] if (group, option) == ("partition", "explicit") else []
        cfg = compose_cfg(f"{group}={option}", *extra)
        check_config(cfg)


def test_groups_set_the_strategy_fields() -> None:
    cfg = compose_cfg("schedule=depth_first", "partition=explicit", "strategy.partition_boundaries=[0,3,5,7,8]")
    assert cfg.strategy.schedule == "depth_first"
    assert cfg.strategy.partition == "explicit"
    assert list(cfg.strategy.partition_boundaries) == [0, 3, 5, 7, 8]
    assert cfg.strategy.sharding == "none"
    grouped = compose_cfg("schedule=breadth_first_grouped", "sharding=full").strategy
    assert (grouped.schedule, grouped.breadth_first_micro_batches, grouped.sharding) == ("breadth_first", 2, "full")
    # a direct override of the strategy field wins over the group, given before or after it
    assert compose_cfg("strategy.schedule=gpipe").strategy.schedule == "gpipe"
    assert compose_cfg("strategy.schedule=gpipe", "schedule=depth_first").strategy.schedule == "gpipe"
    # the groups belong to strategy=bfpp: the other strategies compose without them
    for other in ("ddp", "single"):
        cfg = compose_cfg(f"strategy={other}")
        check_config(cfg)
        assert "schedule" not in cfg.strategy and "schedule" not in cfg


def test_strategy_instantiates_with_the_configured_values() -> None:
    cfg = compose_cfg("schedule=depth_first", "strategy.pipeline_parallel_size=4", "partition=parameters")
    strategy = instantiate(cfg.strategy, _convert_="all")
    assert isinstance(strategy, BFPPStrategy)
    assert (strategy.stages_per_rank, strategy.schedule_name, strategy.partition_method) == (
        2,
        "depth_first",
        "parameters",
    )
    assert strategy.pipeline_parallel_size == 4 and strategy.micro_batches == 4


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("strategy.foo=1", "strategy.foo"),
        ("trainer.max_step=3", "trainer.max_step"),
        ("strategy.stages_per_rank=two", "strategy.stages_per_rank"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("sharding=zero4", "sharding"),
        ("schedule=bfs", "schedule"),
    ],
)
def test_bad_keys_and_values_fail_when_composed(override: str, named: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_cfg(override)
    text = str(error.value) + str(error.value.__cause__)
    assert named in text


def test_added_unknown_keys_are_rejected() -> None:
    cfg = compose_cfg("+strategy.foo=1")  # `+` adds keys even to structured configs: checked at start instead
    with pytest.raises(ConfigError, match=r"strategy\.foo"):
        check_config(cfg)


def test_bad_choices_are_refused_when_composed_listing_the_choices() -> None:
    bad = [
        ("strategy.schedule=nope", "Invalid value 'nope', expected one of [breadth_first, depth_first, gpipe, 1f1b, "),
        ("strategy.sharding=zero4", "Invalid value 'zero4', expected one of [none, optimizer, gradients, full]"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigCompositionException) as error:
            compose_cfg(override)
        assert message in str(error.value.__cause__), str(error.value.__cause__)
    with pytest.raises(Exception, match="schedule='nope' is not supported"):  # a plain dict: the options' check
        instantiate({"_target_": "lightning_bfpp.BFPPStrategy", "schedule": "nope"})


def test_pipeline_layout_is_checked_before_launch() -> None:
    cfg = compose_cfg("model.n_layer=2", "model.n_embd=16", "model.n_head=2", "strategy.stages_per_rank=3")
    kwargs = resolve_trainer(cfg)
    model = GPT(vocab_size=256, seq_len=8, **OmegaConf.to_container(cfg.model))
    with pytest.raises(ConfigError, match="only 4 layers"):
        check_pipeline(cfg, build_strategy(cfg), model, kwargs)
    cfg = compose_cfg("strategy.micro_batches=3")
    with pytest.raises(ConfigError, match=r"data\.batch_size=16: .* does not split into micro_batches=3"):
        check_pipeline(cfg, build_strategy(cfg), model, resolve_trainer(cfg))


def checks_before_launch(cfg) -> None:
    """What the main job checks before it starts any process (``lightning_bfpp.hydra.run``), on a tiny GPT."""
    check_config(cfg)
    check_single_device(cfg)
    kwargs = resolve_trainer(cfg)
    strategy = build_strategy(cfg)
    check_pipeline(cfg, strategy, GPT(vocab_size=256, seq_len=8, n_layer=6, n_embd=16, n_head=2), kwargs)


CONFLICTS = {  # overrides, each valid alone -> what the message must say
    "gpipe-with-looped-stages": (("schedule=gpipe",), ("gpipe places one stage per rank", "stages_per_rank=2")),
    "explicit-no-boundaries": (("partition=explicit",), ("partition='explicit' needs partition_boundaries",)),
    "boundaries-not-explicit": (
        ("strategy.partition_boundaries=[0,2,4,6,8]",),
        ("partition_boundaries is only used with partition='explicit'",),
    ),
    "batched-weight-gradients-fsdp": (
        ("sharding=full", "strategy.weight_gradients=batched"),
        ("weight_gradients='batched' does not work with sharding='full'",),
    ),
    "groups-of-depth-first": (
        ("schedule=depth_first", "strategy.breadth_first_micro_batches=2"),
        ("breadth_first_micro_batches=2 groups the micro-batches of schedule='breadth_first'",),
    ),
    "single-on-two": (("strategy=single", "trainer.devices=2"), ("strategy=single", "trainer.devices=2")),
}


@pytest.mark.parametrize(("overrides", "named"), list(CONFLICTS.values()), ids=list(CONFLICTS))
def test_conflicting_options_fail_before_launch(overrides: tuple[str, ...], named: tuple[str, ...]) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(Exception) as error:  # ConfigError from the job, or the options' own error via Hydra
        checks_before_launch(cfg)
    text = f"{error.value} {error.value.__cause__}"
    assert all(part in text for part in named), text


def test_valid_layouts_pass_the_checks_before_launch() -> None:
    for overrides in [(), ("schedule=gpipe", "strategy.stages_per_rank=1"), ("schedule=breadth_first_grouped",)]:
        checks_before_launch(compose_cfg(*overrides))
    checks_before_launch(compose_cfg("partition=explicit", "strategy.partition_boundaries=[0,1,3,5,8]"))


def test_conflicting_options_stop_the_job_before_it_starts(tmp_path: Path) -> None:
    """The main job exits non-zero within seconds, before any process group exists, naming both options."""
    code, output = run_script(
        ROOT / "examples" / "train.py", ["schedule=gpipe", f"hydra.run.dir={tmp_path}"], timeout=60, cwd=ROOT
    )
    assert code != 0
    assert "gpipe places one stage per rank" in output and "stages_per_rank=2" in output, output[-3000:]
    assert "Initializing distributed" not in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")
@pytest.mark.parametrize(
    ("overrides", "devices"),
    [
        ((), 2),
        (("strategy.pipeline_parallel_size=4",), 4),
        (("strategy=ddp",), 2),
        (("strategy=single",), 1),
        (("trainer.devices=3", "strategy=ddp"), 3),
    ],
)
def test_auto_devices_on_cpu(overrides: tuple[str, ...], devices: int) -> None:
    kwargs = resolve_trainer(compose_cfg(*overrides))
    assert kwargs["accelerator"] == "cpu" and kwargs["devices"] == devices and kwargs["precision"] == "32-true"


# ---------------------------------------------------------------------------------------------------------- data
def test_text_sources(tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello " * 100)
    (tmp_path / "texts" / "b.md").write_text("world " * 100)
    (tmp_path / "texts" / "blob.dat").write_bytes(b"\0\1\2" * 10)  # binary: skipped
    (tmp_path / "texts" / ".hidden").write_text("secret")
    tokens, vocab, _ = load_tokens(str(tmp_path / "texts"))
    assert vocab == 256 and len(tokens) == 1200 and bytes(tokens[:6]) == b"hello "
    tokens, _, _ = load_tokens(str(tmp_path / "texts"), glob="*.md")
    assert len(tokens) == 600
    np.save(tmp_path / "ids.npy", np.arange(1000, dtype=np.int32) % 500)
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    data = TextDataModule(str(tmp_path / "ids.npy"), seq_len=16, batch_size=4, val_fraction=0.1)
    assert data.vocab_size == 500 and len(data.val_tokens) == 100
    tokens, vocab, _ = load_tokens(str(tmp_path / "ids.bin"), dtype="uint16")
    assert vocab is None and tokens[-1] == 999
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        load_tokens(str(tmp_path / "missing"))


def test_stdlib_corpus_and_windows() -> None:
    data = TextDataModule(seq_len=32, batch_size=4, max_tokens=100_000)
    assert data.vocab_size == 256 and "standard library" in data.description
    whole = RandomWindows(data.train_tokens, 32, batch_size=8, seed=3)
    halves = [RandomWindows(data.train_tokens, 32, batch_size=4, seed=3, replicas=2, rank=r) for r in (0, 1)]
    batch = whole.batch(5)
    assert batch["input_ids"].shape == (8, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert torch.equal(torch.cat([h.batch(5)["input_ids"] for h in halves]), batch["input_ids"])
    resumed = next(iter(RandomWindows(data.train_tokens, 32, batch_size=8, seed=3, start=5)))
    assert torch.equal(resumed["input_ids"], batch["input_ids"])


def test_shapes_are_balanced_and_deterministic() -> None:
    images, labels = make_shapes(600, 16, noise=0.0, seed=0)
    assert images.shape == (600, 1, 16, 16)
    assert torch.bincount(labels, minlength=len(SHAPES)).min() > 60
    assert all((images[labels == c].flatten(1).amax(1) > 0).all() for c in range(len(SHAPES)))
    assert torch.equal(make_shapes(10, 16, 0.3, seed=1)[0], make_shapes(10, 16, 0.3, seed=1)[0])


@pytest.mark.parametrize("mode", ["none", "optimizer", "gradients", "full"])
def test_sharding_group_selects_the_mode(mode: str) -> None:
    cfg = compose_cfg(f"sharding={mode}")
    assert instantiate(cfg.strategy, _convert_="all").sharding == mode


def test_strategy_options_are_read_only_after_construction() -> None:
    """The runtime reads the strategy's options: assigning one afterwards would be silently ignored, so it raises."""
    strategy = BFPPStrategy(pipeline_parallel_size=2, sharding="full", schedule="depth_first")
    assert (strategy.sharding, strategy.schedule_name) == (strategy.options.sharding, strategy.options.schedule)
    assert (strategy.sharding, strategy.schedule_name) == ("full", "depth_first")
    with pytest.raises(AttributeError, match=r"pass sharding='none' to BFPPStrategy\(\.\.\.\)"):
        strategy.sharding = "none"
    assert strategy.options.sharding == "full"
