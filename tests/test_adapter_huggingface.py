"""The Hugging Face adapter: its layer stack computes the transformers forward, a pipelined fine-tuning equals the
unwrapped model trained on one process with a plain torch loop, and weights load from and export to the
``save_pretrained`` layout. transformers is a CI dependency: these tests fail, not skip, without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hf_models import LR, SEQUENCE, VOCAB, WEIGHT_DECAY, TokenData, config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BertConfig, PreTrainedModel

from lightning_bfpp.adapters.huggingface import HuggingFaceCausalLM, causal_lm_loss, export_pretrained

STEPS, MICRO_BATCHES, REPLICAS, MICRO_BATCH = 3, 2, 2, 2
DATA_SIZE = STEPS * MICRO_BATCHES * MICRO_BATCH * REPLICAS  # one epoch of 3 steps; the validation takes 3 batches
SEED = 1  # run_job's seed_everything


def pretrained(tmp_path: Path, family: str, tied: bool, seed: int = 0) -> Path:
    """A randomly initialized model written by ``save_pretrained`` (float32, as checkpoints usually are)."""
    torch.manual_seed(seed)
    path = tmp_path / f"{family}-{'tied' if tied else 'untied'}"
    AutoModelForCausalLM.from_config(config(family, tied)).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("family", "tied", "attn"),
    [("gpt2", True, "eager"), ("gpt2", False, "sdpa"), ("llama", False, "eager"), ("llama", True, "sdpa")],
)
def test_layers_compute_the_model_forward(tmp_path: Path, family: str, tied: bool, attn: str) -> None:
    """Loaded from a ``save_pretrained`` directory, the adapter holds the model's state dict under the same keys and
    its layer stack gives the logits of the transformers forward exactly, with a padding mask and packed
    sequences too; its loss is transformers' loss. An instantiated model wraps the same way, and a state dict exports
    to a directory transformers loads."""
    path = pretrained(tmp_path, family, tied)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float64).eval()
    module = HuggingFaceCausalLM.from_pretrained(path, attn_implementation=attn)
    assert all(p.is_meta for p in module.parameters())  # nothing allocated until the layers are materialized
    module.configure_model()
    module.double().eval()
    assert module.state_dict().keys() == hf.state_dict().keys()
    for key, value in hf.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    assert (module.lm_head.weight is module.pipeline_layers()[0].weight) == tied

    ids = torch.randint(0, VOCAB, (3, SEQUENCE), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[0, -4:] = 0
    packed = torch.arange(SEQUENCE).remainder(SEQUENCE // 2).expand(3, -1).contiguous()  # two sequences per row
    for extra in ({}, {"attention_mask": padding}, {"position_ids": packed}):
        with torch.no_grad():  # without a cache, as in training: restarting positions mark packed sequences
            expected = hf(input_ids=ids, use_cache=False, **extra).logits
            assert torch.equal(module({"input_ids": ids, **extra}), expected), list(extra)
    wrapped = HuggingFaceCausalLM(hf)  # an instantiated model: its own modules, under the same names
    assert wrapped.state_dict().keys() == hf.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(wrapped(ids), hf(input_ids=ids).logits)

    export_pretrained(module.state_dict(), tmp_path / "exported", config=module.hf_config)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float64)
    assert (back.lm_head.weight is back.get_input_embeddings().weight) == tied
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    checkpoint = {"state_dict": module.state_dict()}  # a one-file Lightning checkpoint, with what the module adds
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    export_pretrained(tmp_path / "plain.ckpt", tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(f.get_tensor(key), hf.state_dict()[key].to(torch.bfloat16)), key

    hf.float()
    module.float()
    with torch.no_grad():
        labels = ids.masked_fill(padding == 0, -100)
        expected_loss = hf(input_ids=ids, labels=labels).loss
        assert torch.equal(causal_lm_loss(module({"input_ids": ids}), labels), expected_loss)


def reference_training(hf: PreTrainedModel, data: TokenData, batch_size: int) -> list[float]:
    """The unwrapped model trained with a plain torch loop on one process: AdamW, the whole batch at once."""
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    hf.train()
    losses = []
    for step in range(STEPS):
        ids = data.ids[step * batch_size : (step + 1) * batch_size]
        logits = hf(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def reference_loss(hf: PreTrainedModel, data: TokenData, batch_size: int) -> float:
    """The mean loss of the model over ``data`` in batches of ``batch_size``."""
    hf.eval()
    losses = []
    for start in range(0, len(data), batch_size):
        ids = data.ids[start : start + batch_size]
        logits = hf(input_ids=ids).logits
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item())
    return sum(losses) / len(losses)


RUNS = [
    # (name, family, tied, built from: "config" or "pretrained", strategy options)
    ("gpt2-tied-P2-L2", "gpt2", True, "pretrained", {"stages_per_rank": 2}),
    ("llama-untied-P2-L2", "llama", False, "config", {"stages_per_rank": 2}),
    ("gpt2-untied-P2-full", "gpt2", False, "config", {"stages_per_rank": 1, "sharding": "full"}),
    ("llama-tied-P2-full", "llama", True, "pretrained", {"stages_per_rank": 1, "sharding": "full"}),
]


def test_pipelined_fine_tuning_matches_one_process_and_exports(run_job, tmp_path: Path, monkeypatch) -> None:
    """One launch of 4 ranks (P=2 x D=2), a run per case: GPT-2 and Llama, tied and untied, from a config (meta
    device, transformers' initialization per layer) and from a ``save_pretrained`` directory (each rank reads its
    layers' keys), P=2 x L=2 and P=2 x L=1 with ``sharding="full"``. Float64, 3 AdamW steps: the losses, a
    validation after the fit and the exported weights equal those of the unwrapped model trained on one process; each
    rank allocated nothing before set-up and holds only its layers."""
    runs, references = [], {}
    data = TokenData(DATA_SIZE)
    batch = MICRO_BATCHES * MICRO_BATCH
    monkeypatch.setenv("PL_GLOBAL_SEED", str(SEED))  # the per-layer seeds of run_job's run
    for name, family, tied, source, strategy in RUNS:
        cfg = config(family, tied)
        if source == "config":
            model: dict[str, Any] = {"source": cfg.to_dict()}
            torch.set_default_dtype(torch.float64)  # as under the run's precision="64-true"
            try:
                start = HuggingFaceCausalLM(cfg.to_dict(), attn_implementation="sdpa")
            finally:
                torch.set_default_dtype(torch.float32)
            start.configure_model()  # the one-process initialization, layer by layer
            hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float64)
            hf.load_state_dict(start.state_dict())
        else:
            path = pretrained(tmp_path, family, tied, seed=len(runs))
            model = {"source": str(path)}
            hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float64)
        initial = {k: v.clone() for k, v in hf.state_dict().items()}
        references[name] = (hf, reference_training(hf, data, batch * REPLICAS), initial)
        runs.append(
            {
                "name": name,
                "model": model,
                "strategy": {"pipeline_parallel_size": 2, "micro_batches": MICRO_BATCHES, **strategy},
                "record_initial": "sharding" not in strategy,  # whole tensors (not shards) to compare
                "validate_after": not runs,  # the first run validates its trained model on the training data
            }
        )
    job = {
        "devices": 4,
        "model_class": "hf_models:build_adapter",
        "dataset": "hf_models:TokenData",
        "data_size": DATA_SIZE,
        "build_on": "init_module",  # on the meta device until set-up, also for a model built from a config
        "batch_size": batch,
        "max_steps": STEPS,
        "save_checkpoint": "last.ckpt",
        "runs": runs,
    }
    result = run_job(job, timeout=240)
    for run in runs:
        name = run["name"]
        hf, losses, initial = references[name]
        out = result.out_dir / name
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]
        for rank in ranks:
            assert rank["allocated_before_setup"] == [], name
            torch.testing.assert_close(torch.tensor(rank["logged"]), torch.tensor(losses), rtol=1e-10, atol=0)
        held = {frozenset(rank["state"]) for rank in ranks}  # the two pipeline ranks' layers, the same per replica
        assert len(held) == 2 and frozenset.intersection(*held) == set(), name
        assert frozenset.union(*held) == set(hf.state_dict()), name
        if run["validate_after"]:
            expected = reference_loss(hf, data, batch * REPLICAS)
            for rank in ranks:
                assert rank["validated"][0]["val_loss"] == pytest.approx(expected, rel=1e-10, abs=0)
        if run["record_initial"]:
            for rank in ranks:  # the initial weights of one process: read from the files or initialized per layer
                for key, value in rank["initial"].items():
                    assert torch.equal(value, initial[key]), (name, key)

        exported = tmp_path / f"{name}-export"
        export_pretrained(out / "last.ckpt", exported)  # the bfpp checkpoint directory, read in this one process
        tied = "-tied-" in name
        with safe_open(exported / "model.safetensors", framework="pt") as f:
            assert ("lm_head.weight" in f.keys()) == (not tied), name  # noqa: SIM118 (the layout save_pretrained writes)
        back = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float64)
        assert (back.lm_head.weight is back.get_input_embeddings().weight) == tied
        trained = hf.state_dict()
        assert back.state_dict().keys() == trained.keys()
        for key, value in trained.items():
            torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-9, atol=1e-12, msg=f"{name} {key}")
            assert not torch.equal(value, initial[key]) or "bias" in key or "norm" in key or "ln" in key, key


def test_bad_input_is_refused_with_the_fix(tmp_path: Path) -> None:
    """An architecture the adapter does not know, a checkpoint lacking a weight, a batch with token type ids or
    without token ids are refused, when the module is built or by a hook every rank runs before a step, naming what to
    change."""
    with pytest.raises(ValueError, match=r"supports the model types \['gpt2', 'llama'\], not 'bert'"):
        HuggingFaceCausalLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2))
    path = pretrained(tmp_path, "llama", tied=False)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HuggingFaceCausalLM(tmp_path)  # no weights there
    deeper = config("llama", tied=False)
    deeper.num_hidden_layers = 5
    deeper.save_pretrained(path)  # the config now asks for a block the weights do not have
    with pytest.raises(KeyError, match=r"lacks \['model.layers.4.self_attn.q_proj.weight'"):
        HuggingFaceCausalLM(path)
    module = HuggingFaceCausalLM(config("gpt2", tied=True))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="token_type_ids"):  # checked by a hook every rank runs before the step
        module.on_train_batch_start({"input_ids": ids, "token_type_ids": ids}, 0)
    with pytest.raises(ValueError, match=r"a dict with 'input_ids'; got \['tokens'\]"):
        module.on_validation_batch_start({"tokens": ids}, 0)


def test_models_without_a_causal_lm_head_and_too_long_sequences_are_refused() -> None:
    """A base model or a model with another head is refused when the adapter is built, naming the supported classes;
    a sequence longer than GPT-2's position table is refused before the step, naming the limit (Llama's rotary
    positions have no table: a longer sequence runs, as in transformers)."""
    from transformers import GPT2ForSequenceClassification, GPT2Model, LlamaForSequenceClassification

    gpt2, llama = config("gpt2", tied=False), config("llama", tied=False)
    for model in (GPT2Model(gpt2), GPT2ForSequenceClassification(gpt2), LlamaForSequenceClassification(llama)):
        with pytest.raises(TypeError, match=rf"\(GPT2LMHeadModel, LlamaForCausalLM\), not {type(model).__name__} "):
            HuggingFaceCausalLM(model)
    too_long = {"input_ids": torch.zeros(2, 33, dtype=torch.long)}  # the configs have 32 positions
    module = HuggingFaceCausalLM(AutoModelForCausalLM.from_config(gpt2))
    with pytest.raises(ValueError, match=r"sequences of 33 tokens, but the model has 32 positions \(n_positions=32"):
        module.on_train_batch_start(too_long, 0)
    with pytest.raises(ValueError, match="cut the sequences to at most 32 tokens"):
        module.on_validation_batch_start(too_long, 0)
    module.on_train_batch_start({"input_ids": torch.zeros(2, 32, dtype=torch.long)}, 0)
    HuggingFaceCausalLM(config("llama", tied=False)).on_train_batch_start(too_long, 0)


def test_a_model_given_in_eval_mode_trains_in_train_mode() -> None:
    """``from_pretrained`` returns a model in eval mode; the adapter, a fresh LightningModule, trains it with dropout,
    as Lightning's ``fit`` trains a module built in train mode."""
    cfg = config("gpt2", tied=True)
    cfg.resid_pdrop = 0.5
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    module = HuggingFaceCausalLM(hf)
    assert all(m.training for m in module.modules())
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}
    assert not torch.equal(module(batch), module(batch))  # dropout is on
