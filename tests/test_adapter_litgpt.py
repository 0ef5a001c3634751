"""The LitGPT adapter: LitGPT's GPT under bfpp trains exactly like ``litgpt.GPT`` trained on one process with a plain
torch loop (float64), starts from a LitGPT checkpoint that each rank reads only its layers of, and exports to LitGPT's
``lit_model.pth``. litgpt is a test dependency (the ``litgpt`` extra): without it these tests fail, they do not skip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import litgpt.model
import pytest
import torch
import torch.nn.functional as F
from conftest import JobResult
from litgpt import GPT, Config
from litgpt.utils import save_config
from models import TokenData, rmsnorm_in_input_dtype

from lightning_bfpp.adapters.litgpt import (
    LitGPTModule,
    layer_names,
    litgpt_state_dict,
    main,
)
from lightning_bfpp.plan.partition import build_partition

VOCAB, SEQ_LEN, MICRO_BATCH, STEPS = 64, 8, 2, 3
OPTIM = {"learning_rate": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}
SMALL = {"vocab_size": VOCAB, "padded_vocab_size": VOCAB, "block_size": 16}

# name: (LitGPT config name, its overrides, tie_embeddings, strategy); every layout has D = 2 replicas
CASES: dict[str, tuple[str, dict[str, Any], bool, dict[str, Any]]] = {
    # LayerNorm, parallel residual, GPT-NeoX MLP, rotary on a quarter of each head; P=2 x L=2 looped stages
    "pythia": (
        "pythia-14m",
        {"n_layer": 2, "n_embd": 32, "n_head": 4, **SMALL},
        False,
        {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2},
    ),
    # Llama style: RMSNorm, SwiGLU MLP, Llama-3 scaled RoPE, grouped-query attention (4 heads, 2 groups); ZeRO-3
    "llama-gqa": (
        "Llama-3.2-1B",
        {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_query_groups": 2, "intermediate_size": 64, **SMALL},
        False,
        {"pipeline_parallel_size": 2, "stages_per_rank": 1, "micro_batches": 2, "sharding": "full"},
    ),
    # Gemma 2 (tied in its Hugging Face release): scaled embeddings, sliding-window and soft-capped attention,
    # soft-capped logits, extra norms; embedding and head tied across pipeline ranks; P=2 x L=2, ZeRO-3
    "gemma2-tied": (
        "gemma-2-2b",
        {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_query_groups": 2, "head_size": 8, "intermediate_size": 64} | SMALL,
        True,
        {"pipeline_parallel_size": 2, "stages_per_rank": 2, "micro_batches": 2, "sharding": "full"},
    ),
}


def litgpt_config(case: str) -> Config:
    name, overrides, _, _ = CASES[case]
    return Config.from_name(name, **overrides)


def pretrained_checkpoint(case: str, path: Path) -> Path:
    """A LitGPT ``lit_model.pth`` (float32) of random weights, norms included, as a pretrained checkpoint."""
    torch.manual_seed(7)
    gpt = GPT(litgpt_config(case))
    if CASES[case][2]:
        gpt.transformer.wte.weight = gpt.lm_head.weight
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            is_norm_weight = ("norm" in name or "ln_f" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm_weight else 0.1 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(gpt.state_dict(), path)
    return path


def reference(case: str, checkpoint: Path, global_batch: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``litgpt.GPT`` from the checkpoint, trained in float64 on one process with a plain torch loop: the losses of
    each step and the final state dict."""
    gpt = GPT(litgpt_config(case)).double()
    if CASES[case][2]:
        gpt.transformer.wte.weight = gpt.lm_head.weight  # LitGPT's pretraining tie
    gpt.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    optimizer = torch.optim.AdamW(
        gpt.parameters(), lr=OPTIM["learning_rate"], weight_decay=OPTIM["weight_decay"], betas=tuple(OPTIM["betas"])
    )
    tokens = TokenData(STEPS * global_batch, SEQ_LEN, VOCAB).tokens
    losses = []
    for step in range(STEPS):
        batch = tokens[step * global_batch : (step + 1) * global_batch]
        logits = gpt(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in gpt.state_dict().items()}


def held_keys(case: str, pipeline_rank: int) -> set[str]:
    """The state-dict keys of the layers that ``pipeline_rank`` holds under the case's partition."""
    _, _, tie, strategy = CASES[case]
    module = LitGPTModule(litgpt_config(case), tie_embeddings=tie)
    layers = module.pipeline_layers()
    partition = build_partition(layers, strategy["pipeline_parallel_size"], strategy["stages_per_rank"])
    names = layer_names(module.litgpt_config)
    held = [names[i] for stage in partition.stages_of(pipeline_rank) for i in partition.layers_of(stage)]
    return {key for key in module.state_dict() if any(key.startswith(name + ".") for name in held)}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_is_litgpts(case: str) -> None:
    """The module materialized on one process computes bitwise the logits of ``litgpt.GPT`` with the same weights,
    and holds them under the same state-dict keys, in the same order."""
    _, _, tie, _ = CASES[case]
    gpt = GPT(litgpt_config(case)).double()
    if tie:
        gpt.transformer.wte.weight = gpt.lm_head.weight
    module = LitGPTModule(litgpt_config(case), tie_embeddings=tie)
    assert all(p.is_meta for p in module.parameters())  # built on the meta device
    module.configure_model()
    module = module.double()
    assert list(module.state_dict()) == list(gpt.state_dict())
    module.load_state_dict(gpt.state_dict(), strict=True)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(module({"input_ids": ids}), gpt(ids))


def test_bfpp_training_equals_litgpt_on_one_process(run_job, tmp_path: Path, monkeypatch) -> None:
    """One launch of 4 processes (D = 2 replicas), one run per case: each starts from a LitGPT checkpoint, every
    rank holds and loads only its layers, and after 3 AdamW steps in float64 the losses and the weights exported to
    LitGPT's keys equal ``litgpt.GPT`` trained on one process with the global batch; the export loads into
    ``litgpt.GPT`` strictly. RMSNorm computes in float64 on both sides (LitGPT's computes in float32 even in a
    float64 model, see ``models.rmsnorm_in_input_dtype``), so that the comparison holds to 1e-9."""
    monkeypatch.setattr(litgpt.model.RMSNorm, "forward", rmsnorm_in_input_dtype)
    checkpoints = {
        case: pretrained_checkpoint(case, tmp_path / "pretrained" / case / "lit_model.pth") for case in CASES
    }
    runs = []
    for case, (name, overrides, tie, strategy) in CASES.items():
        model = {"name": name, "overrides": overrides, "checkpoint": str(checkpoints[case]), "tie_embeddings": tie}
        model["exact_rmsnorm"] = True
        runs.append({"name": case, "strategy": strategy, "model": model | OPTIM})
    config = {
        "devices": 4,
        "model_class": "LitGPTModule",
        "tokens": {"seq_len": SEQ_LEN, "vocab": VOCAB},
        "batch_size": 2 * MICRO_BATCH,
        "data_size": STEPS * 2 * 2 * MICRO_BATCH,
        "max_steps": STEPS,
        "record_initial": True,
        "save_checkpoint": "model.ckpt",
        "runs": runs,
    }
    result = run_job(config, timeout=400)
    for case in CASES:
        out = JobResult(0, result.output, result.out_dir / case)
        pretrained = torch.load(checkpoints[case], weights_only=True)
        losses, expected = reference(case, checkpoints[case], global_batch=2 * config["batch_size"])

        for rank in out.ranks():
            # each rank holds only its layers, loaded from the checkpoint (not initialized at random)
            assert set(rank["initial"]) == held_keys(case, pipeline_rank=rank["rank"] // 2), case
            for key, value in rank["initial"].items():
                assert torch.equal(value, pretrained[key].double()), (case, key)
            # the logged loss is the one-process loss of the global batch, on every rank
            logged, expected_losses = torch.tensor(rank["logged"]), torch.tensor(losses)
            torch.testing.assert_close(logged, expected_losses, rtol=1e-9, atol=0, msg=lambda m, c=case: f"{c}: {m}")

        exported_dir = tmp_path / "exported" / case
        assert main([str(out.out_dir / "model.ckpt"), str(exported_dir)]) == 0
        exported = torch.load(exported_dir / "lit_model.pth", weights_only=True)
        assert exported.keys() == litgpt_state_dict(out.out_dir / "model.ckpt").keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(exported[key], value, rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
            assert not torch.equal(value, pretrained[key].double()), (case, key)  # trained
        if CASES[case][2]:
            assert torch.equal(exported["transformer.wte.weight"], exported["lm_head.weight"])
        gpt = GPT(Config.from_file(exported_dir / "model_config.yaml")).double()
        gpt.load_state_dict(exported, strict=True)  # LitGPT loads the export as it is


def test_pretrained_directory_loads_and_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    """A LitGPT checkpoint directory (``model_config.yaml``, ``lit_model.pth``) gives its model and weights; a
    checkpoint of another shape, a tie the checkpoint lacks and a missing file fail when the module is built (on
    every rank, before any process group exists), naming what to change."""
    path = pretrained_checkpoint("pythia", tmp_path / "pythia" / "lit_model.pth")
    save_config(litgpt_config("pythia"), path.parent)
    module = LitGPTModule.from_pretrained(path.parent)
    module.configure_model()
    pretrained = torch.load(path, weights_only=True)
    assert module.state_dict().keys() == pretrained.keys()
    for key, value in module.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    wider = Config.from_name("pythia-14m", **(CASES["pythia"][1] | {"n_embd": 64}))
    with pytest.raises(
        ValueError, match=r"'pythia-14m': other shapes: lm_head.weight \(64, 32\) \(the config's: \(64, 64\)\)"
    ):
        LitGPTModule(wider, checkpoint=path)
    deeper = Config.from_name("pythia-14m", **(CASES["pythia"][1] | {"n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \['transformer.h.2.norm_1.weight'.*LitGPTModule.from_pretrained"):
        LitGPTModule(deeper, checkpoint=path)
    with pytest.raises(ValueError, match=r"tie_embeddings=True, but .* differ .*use tie_embeddings=False"):
        LitGPTModule(litgpt_config("pythia"), checkpoint=path, tie_embeddings=True)
    with pytest.raises(FileNotFoundError, match=r"No LitGPT checkpoint at .*lit_model.pth"):
        LitGPTModule(litgpt_config("pythia"), checkpoint=tmp_path)
    too_long = {"input_ids": torch.zeros(2, 17, dtype=torch.long)}  # the config's block_size is 16
    with pytest.raises(ValueError, match=r"sequences of 17 tokens, but .* block_size=16: shorten the sequences"):
        module.on_train_batch_start(too_long, 0)  # every rank runs it before the step's transfers


def test_random_initialization_is_litgpts_pretraining_one() -> None:
    """Without a checkpoint: GPT-NeoX's initialization as LitGPT's pretraining applies it, per layer."""
    config = Config.from_name("Llama-3.2-1B", **(CASES["llama-gqa"][1] | {"n_embd": 256, "n_layer": 4}))
    module = LitGPTModule(config)
    module.configure_model()
    std = (2 / 5 / 256) ** 0.5
    assert module.transformer.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert module.transformer.h[1].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert module.transformer.h[2].mlp.proj.weight.std().item() == pytest.approx(1 / 16 / 4, rel=0.05)
    assert module.transformer.h[3].attn.proj.weight.std().item() == pytest.approx(1 / 16 / 4, rel=0.05)
    assert torch.equal(module.transformer.ln_f.weight, torch.ones(256))


def test_float64_checkpoint_trains_in_float64_like_litgpt(tmp_path: Path) -> None:
    """A float64 checkpoint builds a float64 module (not the default float32, which would round it): one process
    under ``precision="64-true"`` trains it exactly as ``litgpt.GPT`` in float64. A float32 checkpoint still builds
    in the default dtype."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    case, global_batch = "pythia", 4
    path = pretrained_checkpoint(case, tmp_path / "f32" / "lit_model.pth")
    assert next(LitGPTModule(litgpt_config(case), checkpoint=path).parameters()).dtype == torch.float32
    f64 = tmp_path / "f64" / "lit_model.pth"
    f64.parent.mkdir()
    torch.save({k: v.double() + 1e-9 for k, v in torch.load(path, weights_only=True).items()}, f64)  # float64 digits
    module = LitGPTModule(litgpt_config(case), checkpoint=f64, **OPTIM)
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    data = DataLoader(TokenData(STEPS * global_batch, SEQ_LEN, VOCAB), batch_size=global_batch)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Losses()],
    )
    trainer.fit(module, data)
    expected_losses, expected = reference(case, f64, global_batch)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-9, atol=0)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-9, atol=1e-12, msg=lambda m, k=key: f"{k}: {m}")
