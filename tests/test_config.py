"""The Hydra configuration in ``conf/`` composes, is checked, and maps its groups onto the strategy (in-process)."""

from __future__ import annotations

import inspect
import sys
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

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "examples"))

from bfpp_examples.app import (  # noqa: E402
    ConfigError,
    check_config,
    check_conflicts,
    check_pipeline,
    resolve_trainer,
)
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


def test_strategy_config_mirrors_the_constructor() -> None:
    """BFPPStrategyConfig has one field per constructor argument (minus Lightning's plumbing), with its default."""
    plumbing = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin"}
    params = {n: p for n, p in inspect.signature(BFPPStrategy.__init__).parameters.items() if n != "self"}
    fields = OmegaConf.structured(BFPPStrategyConfig)
    assert set(fields) - {"_target_"} == set(params) - plumbing
    for name in fields:
        if name == "_target_":
            continue
        default = params[name].default
        expected = default.total_seconds() if hasattr(default, "total_seconds") else default
        value = fields[name]
        assert (list(value) == list(expected)) if isinstance(expected, tuple) else value == expected, name


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
        extra = ["partition.boundaries=[0,2,4,6,8]"] if (group, option) == ("partition", "explicit") else []
        cfg = compose_cfg(f"{group}={option}", *extra)
        check_config(cfg)


def test_groups_set_the_strategy_fields() -> None:
    cfg = compose_cfg("schedule=depth_first", "partition=explicit", "partition.boundaries=[0,3,5,7,8]")
    assert cfg.strategy.schedule == "depth_first"
    assert cfg.strategy.partition == "explicit"
    assert list(cfg.strategy.partition_boundaries) == [0, 3, 5, 7, 8]
    assert cfg.strategy.sharding == "none"
    # a direct override of the strategy field wins over the group
    assert compose_cfg("strategy.schedule=gpipe").strategy.schedule == "gpipe"


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


def test_strategy_rejects_bad_choices_with_its_message() -> None:
    bad = [("strategy.schedule=nope", "schedule='nope'"), ("strategy.sharding=zero4", "sharding='zero4'")]
    for override, message in bad:
        cfg = compose_cfg(override)
        with pytest.raises(Exception, match=message):
            instantiate(cfg.strategy, _convert_="all")


def test_pipeline_layout_is_checked_before_launch() -> None:
    cfg = compose_cfg("model.n_layer=2", "model.n_embd=16", "model.n_head=2", "strategy.stages_per_rank=3")
    kwargs = resolve_trainer(cfg)
    model = GPT(vocab_size=256, seq_len=8, **OmegaConf.to_container(cfg.model))
    with pytest.raises(ConfigError, match="only 4 layers"):
        check_pipeline(cfg, model, kwargs)
    cfg = compose_cfg("strategy.micro_batches=3")
    with pytest.raises(ConfigError, match=r"data\.batch_size=16 is not a multiple"):
        check_pipeline(cfg, model, resolve_trainer(cfg))


CONFLICTS = {  # the overrides -> the two options the message must name
    "group-and-field": (("schedule=depth_first", "strategy.schedule=gpipe"),) * 2,
    "gpipe-with-looped-stages": (("schedule=gpipe",), ("schedule=gpipe", "strategy.stages_per_rank=2")),
    "explicit-no-boundaries": (("partition=explicit",), ("partition=explicit", "partition.boundaries")),
    "boundaries-not-explicit": (("partition.boundaries=[0,2,4,6,8]",), ("partition.boundaries=", "partition=uniform")),
    "half-parameters": (("trainer.precision=16-true",), ("trainer.precision=16-true", "strategy=bfpp")),
    "single-on-two": (("strategy=single", "trainer.devices=2"), ("strategy=single", "trainer.devices=2")),
}


@pytest.mark.parametrize(("overrides", "named"), list(CONFLICTS.values()), ids=list(CONFLICTS))
def test_conflicting_options_fail_naming_both(overrides: tuple[str, ...], named: tuple[str, str]) -> None:
    cfg = compose_cfg(*overrides)
    check_config(cfg)  # each option is valid alone
    with pytest.raises(ConfigError) as error:
        check_conflicts(cfg, overrides)
    assert all(option in str(error.value) for option in named), str(error.value)


def test_a_field_override_alone_is_no_conflict() -> None:
    for overrides in [("strategy.schedule=depth_first",), ("schedule=depth_first", "strategy.schedule=depth_first")]:
        check_conflicts(compose_cfg(*overrides), overrides)
    check_conflicts(compose_cfg("schedule=gpipe", "strategy.stages_per_rank=1"), ("schedule=gpipe",))


def test_conflicting_options_stop_the_job_before_it_starts(tmp_path: Path) -> None:
    """The main job exits non-zero within seconds, before any process group exists, naming both options."""
    code, output = run_script(
        ROOT / "examples" / "train.py", ["schedule=gpipe", f"hydra.run.dir={tmp_path}"], timeout=60, cwd=ROOT
    )
    assert code != 0
    assert "schedule=gpipe" in output and "strategy.stages_per_rank=2" in output, output[-3000:]
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
