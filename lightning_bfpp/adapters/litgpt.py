"""LitGPT's ``GPT`` as a :class:`~lightning_bfpp.PipelineModule` (needs ``pip install "lightning-bfpp[litgpt]"``).

:class:`LitGPTModule` builds the model of a ``litgpt.Config`` (any name of LitGPT's config list, with overrides) on
the meta device and computes what ``litgpt.GPT.forward`` computes in training (no KV cache). Its pipeline layers are
LitGPT's own modules under LitGPT's own names::

    transformer.wte, transformer.h.0, ..., transformer.h.<n_layer - 1>, transformer.ln_f, lm_head

so the module's ``state_dict()``, and the strategy's checkpoints, use the keys of LitGPT's ``lit_model.pth``. The
rotary cache is a side input of every block (built once per device and dtype by LitGPT's own code); attention is
causal, as in LitGPT's training forward, so no mask travels.

- Pretrained weights: ``LitGPTModule.from_pretrained("checkpoints/EleutherAI/pythia-14m")`` (a LitGPT checkpoint
  directory) or ``LitGPTModule(config, checkpoint=".../lit_model.pth")``. The file is memory-mapped and each rank
  copies in only the tensors of the layers it holds, when it materializes them.
- Random weights (no checkpoint): LitGPT's pretraining initialization (GPT-NeoX's), layer by layer.
- Tied embeddings (``tie_embeddings=True``): ``transformer.wte.weight`` is ``lm_head.weight``, as LitGPT's pretraining
  option ``tie_embeddings`` makes it; the strategy trains the tie across stages.
- Export: :func:`save_litgpt_checkpoint` (or ``python -m lightning_bfpp.adapters.litgpt CHECKPOINT OUT_DIR``) writes
  ``lit_model.pth`` and ``model_config.yaml`` from a checkpoint of the run, for LitGPT to load.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from litgpt import Config
from litgpt.model import GPT, CausalSelfAttention, LLaMAMLP, do_softcapping
from litgpt.utils import save_config
from torch import Tensor, nn
from typing_extensions import override

from lightning_bfpp.convert import to_lightning_checkpoint
from lightning_bfpp.lightning.module import PipelineModule
from lightning_bfpp.run.checkpoint import is_sharded_checkpoint
from lightning_bfpp.run.checkpoint_files import CheckpointError, load_file

CHECKPOINT_FILENAME = "lit_model.pth"  # LitGPT's weights file in a checkpoint directory
CONFIG_FILENAME = "model_config.yaml"  # LitGPT's config file next to it
IGNORE_INDEX = -100  # labels that do not count in the loss, as in LitGPT


def as_config(config: Config | str | Mapping[str, Any]) -> Config:
    """A ``litgpt.Config`` from a config, a name of LitGPT's config list, or the dict of a config's fields."""
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return Config.from_name(config)
    return Config(**config)


def layer_names(config: Config) -> list[str]:
    """The qualified names of the pipeline layers of ``config``'s model, in order."""
    blocks = [f"transformer.h.{i}" for i in range(config.n_layer)]
    return ["transformer.wte", *blocks, "transformer.ln_f", "lm_head"]


class RopeCache:
    """LitGPT's rotary tables ``cos``, ``sin`` (``block_size`` rows), computed by ``litgpt.GPT.rope_cache`` once per
    device and dtype (cast as ``GPT.to(dtype)`` casts its buffers)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def __call__(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The tables of the first ``length`` positions, with a leading batch dimension of 1."""
        key = (device, dtype)
        if key not in self._tables:
            gpt = SimpleNamespace(config=self.config, max_seq_length=self.config.block_size)
            cos, sin = GPT.rope_cache(gpt, device=device)  # type: ignore[arg-type]
            self._tables[key] = (cos.to(dtype), sin.to(dtype))
        cos, sin = self._tables[key]
        return cos[:length].unsqueeze(0), sin[:length].unsqueeze(0)


class LitGPTModule(PipelineModule):
    """LitGPT's ``GPT`` of ``config``, trained on batches ``{"input_ids": (B, T), "labels": (B, T)}`` (next-token
    ids; ``-100`` is ignored) with the mean cross-entropy over the tokens of a micro-batch, logged as ``train_loss``
    (``val_loss`` in validation).

    Arguments:
        config: a ``litgpt.Config``, a name of LitGPT's config list (``"pythia-14m"``) or a dict of config fields.
        checkpoint: LitGPT weights to start from: a ``lit_model.pth`` file or the directory holding it; its keys and
            shapes are checked against ``config`` when the module is built. The module keeps the checkpoint's dtype
            where it is wider than the default dtype (a float64 checkpoint gives a float64 module, whatever the
            Trainer's precision), else takes the default (a bfloat16 checkpoint gives float32 weights). ``None``:
            LitGPT's random initialization, in the default dtype.
        tie_embeddings: share one weight between ``transformer.wte`` and ``lm_head`` (LitGPT's pretraining option).
        learning_rate, weight_decay, betas: the AdamW optimizer of :meth:`configure_optimizers` (override that method
            for another optimizer or a learning-rate schedule).
    """

    def __init__(
        self,
        config: Config | str | Mapping[str, Any],
        checkpoint: str | Path | None = None,
        tie_embeddings: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        config = as_config(config)
        self.litgpt_config = config
        hparams = {"config": asdict(config), "checkpoint": None if checkpoint is None else str(checkpoint)}
        hparams |= {"tie_embeddings": tie_embeddings, "learning_rate": learning_rate, "weight_decay": weight_decay}
        self.save_hyperparameters({**hparams, "betas": list(betas)})
        self._checkpoint = None if checkpoint is None else checkpoint_file(checkpoint)
        self._pretrained: dict[str, Tensor] | None = None
        dtype = torch.get_default_dtype()
        if self._checkpoint is not None:  # a checkpoint wider than the default dtype is kept as it is (float64)
            dtype = build_dtype(self.pretrained_state(), dtype)
        with torch.device("meta"):  # no memory until the strategy materializes a rank's layers
            gpt = GPT(config).to(dtype)
        self.lm_head = gpt.lm_head  # registered before `transformer`, as in litgpt.GPT (same state-dict order)
        self.transformer = gpt.transformer
        if tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # what LitGPT's pretraining does
        self.rope_cache = RopeCache(config)
        if self._checkpoint is not None:
            check_pretrained(self, self.pretrained_state(), self._checkpoint, tie_embeddings)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, **kwargs: Any) -> LitGPTModule:
        """The model of a LitGPT checkpoint directory (``model_config.yaml`` and ``lit_model.pth``)."""
        checkpoint_dir = Path(checkpoint_dir)
        return cls(Config.from_file(checkpoint_dir / CONFIG_FILENAME), checkpoint=checkpoint_dir, **kwargs)

    def pretrained_state(self) -> dict[str, Tensor]:
        """The tensors of the ``checkpoint`` file, memory-mapped (read from disk only where they are copied)."""
        if self._pretrained is None:
            assert self._checkpoint is not None
            state = load_file(self._checkpoint, mmap=True)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{self._checkpoint} is not a LitGPT checkpoint: it holds no state dict")
            if isinstance(state.get("model"), Mapping):  # a LitGPT training checkpoint: {"model": ..., ...}
                state = state["model"]
            self._pretrained = state
        return self._pretrained

    # ------------------------------------------------------------------------------------------ pipeline hooks
    @override
    def pipeline_layers(self) -> list[nn.Module]:
        return [self.transformer.wte, *self.transformer.h, self.transformer.ln_f, self.lm_head]

    @override
    def pipeline_input(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["input_ids"]

    @override
    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: Any, batch: Any) -> Tensor:
        config = self.litgpt_config
        if index == 0:  # token embedding
            x = layer(inputs)
            return x * torch.tensor(config.n_embd**0.5, dtype=x.dtype) if config.scale_embeddings else x
        if index <= config.n_layer:  # a block: the rotary tables are its side input, attention is causal
            dtype = torch.promote_types(next(layer.parameters()).dtype, torch.float32)  # LitGPT's buffers' dtype
            cos, sin = self.rope_cache(inputs.size(1), inputs.device, dtype)
            if config.rope_indices is not None:
                cos, sin = cos[..., config.rope_indices[index - 1]], sin[..., config.rope_indices[index - 1]]
            return layer(inputs, cos, sin)
        if index == config.n_layer + 1:  # final norm
            return layer(inputs)
        logits = layer(inputs)
        if config.final_logit_softcapping is not None:
            logits = do_softcapping(logits, config.final_logit_softcapping)
        return logits

    @override
    def pipeline_loss(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        loss = language_model_loss(outputs, batch["labels"])
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def pipeline_init_layer(self, index: int, layer: nn.Module) -> None:
        """Copies layer ``index``'s tensors from the checkpoint, or initializes it as LitGPT's pretraining does."""
        if self._checkpoint is None:
            init_layer(layer, self.litgpt_config)
            return
        state, prefix = self.pretrained_state(), layer_names(self.litgpt_config)[index]
        for name, tensor in layer.state_dict(keep_vars=True).items():
            tensor.data.copy_(state[f"{prefix}.{name}"])

    # --------------------------------------------------------------------------------------- Lightning hooks
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Checks the sequence length on every rank before the step (a longer one has no rotary positions)."""
        length, limit = batch["input_ids"].shape[1], self.litgpt_config.block_size
        if length > limit:
            raise ValueError(
                f"The batch holds sequences of {length} tokens, but the LitGPT config allows block_size={limit}: "
                "shorten the sequences, or build the module with a larger block_size."
            )

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = language_model_loss(self(batch), batch["labels"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(
            self.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )


def language_model_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The mean next-token cross-entropy over the labels that are not ``-100``, in float32 or wider."""
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def init_layer(layer: nn.Module, config: Config) -> None:
    """LitGPT's pretraining initialization (GPT-NeoX's) of one layer: embeddings and linear weights normal with
    std ``sqrt(2 / (5 n_embd))``, the output projections of attention and LLaMA MLPs with std
    ``1 / (sqrt(n_embd) n_layer)``, biases zero, norms and other modules by their ``reset_parameters()``."""
    std = math.sqrt(2.0 / 5 / config.n_embd)
    for module in layer.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            _normal(module, std)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    for module in layer.modules():
        if isinstance(module, (CausalSelfAttention, LLaMAMLP)):
            _normal(module.proj, 1 / math.sqrt(config.n_embd) / config.n_layer)


def _normal(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def build_dtype(state: Mapping[str, Tensor], default: torch.dtype) -> torch.dtype:
    """The dtype the module is built in for the checkpoint ``state``: its floating dtype where that is wider than
    ``default`` (a float64 checkpoint stays float64), else ``default`` (a bfloat16 or float16 checkpoint is widened
    exactly to float32, the weights that mixed precision keeps)."""
    dtype = default
    for tensor in state.values():
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The ``lit_model.pth`` named by ``checkpoint`` (the file, or a directory holding it)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No LitGPT checkpoint at {path}: give a {CHECKPOINT_FILENAME} file or the LitGPT checkpoint directory "
            "that holds it (e.g. from `litgpt download`)."
        )
    return path


def check_pretrained(module: nn.Module, state: Mapping[str, Tensor], path: Path, tie_embeddings: bool) -> None:
    """Raises if the checkpoint ``state`` does not fit ``module`` (missing or unexpected keys, other shapes, a tie
    that the checkpoint does not have), naming what differs."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (the config's: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        listed = (("missing", missing), ("unexpected", unexpected))
        problems = [f"{what} {items[:5]}" for what, items in listed if items]
        problems += [f"other shapes: {', '.join(shapes[:5])}"] if shapes else []
        raise ValueError(
            f"The LitGPT checkpoint {path} does not fit the config {module.litgpt_config.name!r}: "
            f"{'; '.join(problems)}. Build the module with the config the checkpoint was saved with (its "
            f"{CONFIG_FILENAME}: LitGPTModule.from_pretrained(<checkpoint directory>))."
        )
    embedding, head = state["transformer.wte.weight"], state["lm_head.weight"]
    if tie_embeddings and not torch.equal(embedding, head):
        raise ValueError(
            f"tie_embeddings=True, but in {path} transformer.wte.weight and lm_head.weight differ (the checkpoint "
            "was trained untied): use tie_embeddings=False."
        )


# ----------------------------------------------------------------------------------------------------- export
def litgpt_state_dict(checkpoint: str | Path) -> dict[str, Tensor]:
    """LitGPT's state dict (the keys of ``lit_model.pth``) of a :class:`LitGPTModule` checkpoint: a bfpp checkpoint
    directory of any layout or a one-file Lightning checkpoint. Runs in one process, without a process group."""
    return _read(Path(checkpoint))[0]


def save_litgpt_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Writes ``out_dir/lit_model.pth`` and ``out_dir/model_config.yaml`` from a :class:`LitGPTModule` checkpoint (a
    bfpp checkpoint directory or a one-file Lightning checkpoint), so that LitGPT loads the trained model
    (``litgpt generate out_dir``, ``GPT(Config.from_file(...)).load_state_dict(torch.load(...))``). Returns the path
    of ``lit_model.pth``."""
    state, config = _read(Path(checkpoint))
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"{checkpoint} does not hold the weights of LitGPT's {config.name!r}: missing "
            f"{sorted(set(expected) - set(state))[:5]}, unexpected {sorted(set(state) - set(expected))[:5]}."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({name: state[name] for name in expected}, out_dir / CHECKPOINT_FILENAME)
    save_config(config, out_dir)
    return out_dir / CHECKPOINT_FILENAME


def _read(path: Path) -> tuple[dict[str, Tensor], Config]:
    if is_sharded_checkpoint(path):
        checkpoint = to_lightning_checkpoint(path)
    elif path.is_file():
        checkpoint = load_file(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'.")
    else:
        raise FileNotFoundError(
            f"{path} is neither a bfpp checkpoint directory nor a Lightning checkpoint file of a LitGPTModule run."
        )
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if config is None:
        raise ValueError(f"{path} has no LitGPT config in its hyper-parameters: it was not saved from a LitGPTModule.")
    state = {name: value for name, value in checkpoint["state_dict"].items() if isinstance(value, Tensor)}
    return state, as_config(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_bfpp.adapters.litgpt",
        description="Export a LitGPTModule checkpoint (a bfpp checkpoint directory or a Lightning .ckpt file) as a "
        f"LitGPT checkpoint directory ({CHECKPOINT_FILENAME} and {CONFIG_FILENAME}).",
    )
    parser.add_argument("checkpoint", help="the checkpoint of the training run")
    parser.add_argument("out_dir", help="the LitGPT checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        written = save_litgpt_checkpoint(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written} and {written.parent / CONFIG_FILENAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
