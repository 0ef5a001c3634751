"""Hugging Face ``transformers`` causal language models (GPT-2 and Llama families) as a :class:`PipelineModule`.

:class:`HuggingFaceCausalLM` holds the submodules of an ``AutoModelForCausalLM`` under their own names, so its
``state_dict()`` keys are those of the transformers model (``transformer.h.3.attn.c_attn.weight``,
``model.layers.3.mlp.up_proj.weight``), and splits it into the layers a pipeline cuts:

- GPT-2: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.<i>``..., ``transformer.ln_f``, ``lm_head``;
- Llama: ``model.embed_tokens``, ``model.layers.<i>``..., ``model.norm``, ``lm_head`` (the rotary embedding, which
  holds no parameters, stays on every rank and computes its cos/sin where a block needs them).

Each layer runs with the arguments the transformers forward gives it (positions, causal mask, rotary cos/sin), so
the stack computes the same function as the model's forward. A model given by its config or its ``save_pretrained``
directory is built on the meta device: each rank allocates only the layers it holds, initialized as transformers
initializes them or read from the checkpoint's safetensors files, one layer's keys at a time.
:func:`export_pretrained` writes a trained model back as a ``save_pretrained`` directory.

Requires the optional extra ``hf`` (``pip install "lightning-bfpp[hf]"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from typing_extensions import override

from lightning_bfpp.adapters.hf_families import as_config, check_causal_lm, family_of
from lightning_bfpp.lightning.module import PipelineModule, StageIO

IGNORE_INDEX = -100  # labels with this value add nothing to the loss, as in transformers
CONFIG_KEY = "hf_config"  # the transformers config (a dict) in a Lightning checkpoint written from this module
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class HuggingFaceCausalLM(PipelineModule):
    """A transformers causal language model (GPT-2 or Llama family) trained as a pipeline of its layers.

    Arguments:
        model: a ``save_pretrained`` directory (safetensors weights), a config (``PretrainedConfig`` or its dict), or
            an instantiated model. A directory or a config builds the model on the meta device: each rank allocates
            only its layers and fills them from the directory's files, or initializes them as transformers does
            (its ``_init_weights``) under the library's per-layer seed, so every layout starts from the same weights
            (not the values ``AutoModelForCausalLM.from_config`` draws). An instantiated model is used as it is.
        lr: AdamW's learning rate (override :meth:`configure_optimizers` for another optimizer).
        weight_decay: AdamW's weight decay, on every parameter.
        betas: AdamW's betas.
        attn_implementation: transformers' attention (``"eager"``, ``"sdpa"``, ...) for a model built here; default:
            transformers' choice.

    A batch is a dict with ``input_ids`` (``batch x sequence``) and optionally ``labels`` (default: ``input_ids``;
    the loss predicts token ``t + 1`` from tokens ``..t`` and ignores labels of -100), ``attention_mask`` (1 for real
    tokens, 0 for padding) and ``position_ids``, or a tensor of token ids. The loss is transformers' causal LM loss
    (cross entropy, mean over the labelled tokens) in the logits' precision, at least float32; under a pipeline it is
    the mean over micro-batches, equal to the batch's token mean when every micro-batch has as many labelled tokens.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | PretrainedConfig | Mapping[str, Any] | PreTrainedModel,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self._checkpoint: SafetensorsCheckpoint | None = None
        if isinstance(model, PreTrainedModel):
            check_causal_lm(model)  # a base model or another head is refused before anything is registered
            hf_model = model
        else:
            if isinstance(model, (str, os.PathLike)):
                self._checkpoint = SafetensorsCheckpoint(Path(model))
                config = AutoConfig.from_pretrained(model)
            else:
                config = as_config(model)
            family_of(config)  # an unsupported model type is refused before anything is built
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with torch.device("meta"):
                hf_model = AutoModelForCausalLM.from_config(config, **kwargs)
        self.hf_config: PretrainedConfig = hf_model.config
        self.family = family_of(self.hf_config)
        self.__dict__["_hf_model"] = hf_model  # not a submodule: its children are registered below, under their names
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        base = self.get_submodule(self.family.base)
        self._layer_names = [f"{self.family.base}.{name}" for name in self.family.embeddings]
        self._layer_names += [f"{self.family.base}.{self.family.blocks}.{i}" for i in range(len(self._blocks(base)))]
        self._layer_names += [f"{self.family.base}.{self.family.norm}", "lm_head"]
        self._first_block = len(self.family.embeddings)
        self._aliases = _aliases(self)  # {name: every name of that parameter} (a tied weight has several)
        if self._checkpoint is not None:
            self._checkpoint.check_covers(self, self._aliases)
        _materialize_outside_layers(self, hf_model, self._layer_names)
        positions = self.family.positions
        # (config field, value): the longest sequence a learned position table allows
        self.max_positions: tuple[str, int] | None = (
            (positions, getattr(self.hf_config, positions)) if positions else None
        )
        self.train()  # as a fresh LightningModule: from_pretrained returns the model in eval mode (dropout off)

    def _blocks(self, base: nn.Module) -> nn.ModuleList:
        return base.get_submodule(self.family.blocks)  # type: ignore[return-value]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> HuggingFaceCausalLM:
        """The model of the ``save_pretrained`` directory ``path``, built on the meta device; each rank reads only
        the weights of its layers. ``kwargs`` go to the constructor."""
        return cls(path, **kwargs)

    # -------------------------------------------------------------------------------------------- pipeline hooks
    @override
    def pipeline_layers(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in self._layer_names]

    @override
    def pipeline_input(self, batch: Any) -> StageIO:
        return _field(batch, "input_ids")

    @override
    def pipeline_layer_forward(self, index: int, layer: nn.Module, inputs: StageIO, batch: Any) -> StageIO:
        assert isinstance(inputs, Tensor)
        if index < self._first_block:
            if index == 0:
                return layer(inputs)  # token embedding
            # GPT-2's position embedding, then the embedding dropout, as in GPT2Model.forward
            _, position_ids = _positions(inputs, batch)
            base = self.get_submodule(self.family.base)
            return base.drop(inputs + layer(position_ids))
        if index >= len(self._layer_names) - 2:
            return layer(inputs)  # the final norm and the LM head
        cache_position, position_ids = _positions(inputs, batch)
        mask = create_causal_mask(
            config=self.hf_config,
            inputs_embeds=inputs,
            attention_mask=_optional_field(batch, "attention_mask"),
            cache_position=cache_position,
            past_key_values=None,
            position_ids=position_ids,
        )
        kwargs: dict[str, Any] = {}
        if self.family.rotary is not None:  # Llama: cos/sin from the rotary embedding of the base model
            rotary = self.get_submodule(f"{self.family.base}.{self.family.rotary}")
            kwargs["position_embeddings"] = rotary(inputs, position_ids=position_ids)
        return layer(
            inputs,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
            cache_position=cache_position,
            **kwargs,
        )

    @override
    def pipeline_loss(self, outputs: StageIO, batch: Any) -> Tensor:
        assert isinstance(outputs, Tensor)
        loss = causal_lm_loss(outputs, _labels(batch))
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def pipeline_init_layer(self, index: int, layer: nn.Module) -> None:
        """Fills layer ``index`` from the checkpoint files (its keys only), or initializes it as transformers does."""
        if self._checkpoint is not None:
            name = self._layer_names[index]
            tensors = [*layer.named_parameters(prefix=name), *_persistent_buffers(layer, name)]
            self._checkpoint.read_into(dict(tensors), self._aliases)
            return
        for submodule in layer.modules():
            self._hf_model._init_weights(submodule)

    # ---------------------------------------------------------------------------------------- Lightning hooks
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        check_batch(batch, self.max_positions)  # on every rank, before the step (a stage that cannot run would
        # leave the others waiting)

    @override
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        check_batch(batch, self.max_positions)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = causal_lm_loss(self(batch), _labels(batch))
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.hf_config.to_dict()  # read by export_pretrained


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Transformers' causal LM loss: token ``t``'s logits predict label ``t + 1``; labels of -100 are ignored; the mean
    over the labelled tokens. Computed in the logits' precision, at least float32 (transformers always uses float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
    )


def check_batch(batch: Any, max_positions: tuple[str, int] | None = None) -> None:
    """Raises a clear error for a batch the adapter cannot run: token ids, or a dict with ``input_ids`` and no
    ``token_type_ids``, no longer than ``max_positions`` allows (``(config field, size)`` of a learned position
    table, GPT-2's ``n_positions``; None for rotary positions, which have no table)."""
    length = _field(batch, "input_ids").shape[-1]
    if max_positions is not None and length > max_positions[1]:
        field, limit = max_positions
        raise ValueError(
            f"The batch holds sequences of {length} tokens, but the model has {limit} positions ({field}={limit} in "
            f"its config): cut the sequences to at most {limit} tokens."
        )
    if isinstance(batch, Mapping) and batch.get("token_type_ids") is not None:
        raise ValueError(
            "HuggingFaceCausalLM does not take token_type_ids: drop them from the batch (the token embedding, "
            "which transformers adds them through, may live on another pipeline stage)."
        )


def _field(batch: Any, name: str) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if not isinstance(batch, Mapping) or name not in batch:
        raise ValueError(
            f"HuggingFaceCausalLM takes a batch of token ids or a dict with {name!r}; got "
            f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
        )
    return batch[name]


def _optional_field(batch: Any, name: str) -> Tensor | None:
    return batch.get(name) if isinstance(batch, Mapping) else None


def _labels(batch: Any) -> Tensor:
    labels = _optional_field(batch, "labels")
    return labels if labels is not None else _field(batch, "input_ids")


def _positions(hidden: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
    """``cache_position`` and ``position_ids`` as the transformers forward makes them without a cache."""
    cache_position = torch.arange(hidden.shape[1], device=hidden.device)
    position_ids = _optional_field(batch, "position_ids")
    return cache_position, position_ids if position_ids is not None else cache_position.unsqueeze(0)


def _persistent_buffers(module: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """The buffers of ``module`` that its state dict holds, named with ``prefix``."""
    keys = set(module.state_dict(prefix=prefix + "." if prefix else "", keep_vars=True))
    return [(name, b) for name, b in module.named_buffers(prefix=prefix) if name in keys]


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """``{name: every name of the same parameter}`` for the parameters of ``module``."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {name: same for same in names.values() for name in same}


@torch.no_grad()
def _materialize_outside_layers(module: nn.Module, hf_model: PreTrainedModel, layer_names: list[str]) -> None:
    """Tensors on the meta device outside the layers (buffers such as the rotary frequencies: every parameter lies in
    a layer) get storage on the CPU and transformers' initialization; the strategy moves them to the device."""
    for name, submodule in module.named_modules():
        if any(name == layer or name.startswith(layer + ".") for layer in layer_names):
            continue
        direct = [t for t in (*submodule._parameters.values(), *submodule._buffers.values()) if t is not None]
        if any(t.is_meta for t in direct):
            with torch.device("cpu"):
                submodule.to_empty(device="cpu", recurse=False)
                hf_model._init_weights(submodule)


class SafetensorsCheckpoint:
    """The safetensors weights of a ``save_pretrained`` directory: one file, or shards listed by an index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            self.file_of = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / SAFETENSORS_FILE).is_file():
            with safe_open(path / SAFETENSORS_FILE, framework="pt") as f:
                self.file_of = {key: path / SAFETENSORS_FILE for key in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise FileNotFoundError(
                f"{path} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}: give a directory written by "
                "save_pretrained (safetensors, the default), or a config to start from fresh weights."
            )

    def key_for(self, names: list[str]) -> str | None:
        """The checkpoint key holding a tensor known under ``names`` (a tied weight is saved under one of its
        names); a key without the base model's prefix (``h.0...`` for ``transformer.h.0...``) is accepted too."""
        for name in names:
            for key in (name, name.partition(".")[2]):
                if key in self.file_of:
                    return key
        return None

    def check_covers(self, module: nn.Module, aliases: dict[str, list[str]]) -> None:
        """Raises, naming them, if tensors of ``module`` are missing from the checkpoint."""
        wanted = [aliases[name] for name, _ in module.named_parameters()]
        wanted += [[name] for name, _ in _persistent_buffers(module)]
        missing = [names[0] for names in wanted if self.key_for(names) is None]
        if missing:
            raise KeyError(
                f"The checkpoint {self.path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} of the "
                f"{type(module).__name__} built from its config.json: give the directory save_pretrained wrote for "
                "this model."
            )

    @torch.no_grad()
    def read_into(self, tensors: dict[str, Tensor], aliases: dict[str, list[str]]) -> None:
        """Copies the checkpoint's values into ``tensors`` (``{name: tensor}``), reading only their keys."""
        by_file: dict[Path, list[tuple[str, Tensor]]] = {}
        for name, tensor in tensors.items():
            key = self.key_for(aliases.get(name, [name]))
            if key is None:
                raise KeyError(f"The checkpoint {self.path} lacks {name!r}.")
            by_file.setdefault(self.file_of[key], []).append((key, tensor))
        for file, pairs in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key, tensor in pairs:
                    value = f.get_tensor(key)
                    if tuple(value.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"{key} has shape {tuple(value.shape)} in {file}, the model expects {tuple(tensor.shape)}."
                        )
                    tensor.copy_(value)


def export_pretrained(
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    out_dir: str | os.PathLike[str],
    config: PretrainedConfig | Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Writes a ``save_pretrained`` directory (safetensors and ``config.json``) that
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads, from the weights of a :class:`HuggingFaceCausalLM`.

    Arguments:
        source: a checkpoint of the module (a bfpp checkpoint directory, any layout, or a one-file Lightning
            checkpoint) or its ``state_dict()``. Runs in one process, without a process group.
        out_dir: the directory to write.
        config: the transformers config; default: the one the checkpoint stores (needed for a state dict).
        dtype: the dtype to save in (default: the trained one).
    """
    state, stored = _read_weights(source)
    if config is None and stored is None:
        raise ValueError("export_pretrained needs config=... for a state dict (a checkpoint of the module stores it).")
    config = as_config(config if config is not None else stored)  # type: ignore[arg-type]
    family_of(config)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()  # `assign` replaced the tied parameter by two tensors; one again, as save_pretrained expects
    hf_model.save_pretrained(out_dir)


def _read_weights(source: str | os.PathLike[str] | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
    """``(state dict, stored transformers config or None)`` of ``source``."""
    if isinstance(source, Mapping):
        return dict(source), None
    from lightning_bfpp.convert import to_state_dict
    from lightning_bfpp.run.checkpoint import META_FILENAME, is_sharded_checkpoint
    from lightning_bfpp.run.checkpoint_files import load_file

    path = Path(source)
    if is_sharded_checkpoint(path):
        meta = load_file(path / META_FILENAME)
        return to_state_dict(path), meta.get(CONFIG_KEY)
    if path.is_file():
        checkpoint = load_file(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'.")
        return checkpoint["state_dict"], checkpoint.get(CONFIG_KEY)
    raise FileNotFoundError(f"{path} is neither a bfpp checkpoint directory nor a Lightning checkpoint file.")
