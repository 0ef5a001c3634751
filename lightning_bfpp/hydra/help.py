"""The app's ``--help`` page: the config groups a user chooses from (not the internal ``schema/*`` ones), what each
option of the strategy means (from :class:`~lightning_bfpp.options.PipelineOptions`) and the composed config."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lightning_bfpp.options import PipelineOptions, shown_default

HELP_NAME = "bfpp"
_GROUPS_RESOLVER = "bfpp_help_groups"
_HIDDEN = ("hydra", "schema")  # Hydra's own groups (--hydra-help lists them) and the structured configs


def _plain(text: str) -> str:
    """Markdown of an option's description as terminal text (links to README sections become their titles)."""
    return re.sub(r"\[([^]]+)\]\(#[^)]+\)", r"\1", text).replace("`", "")


def options_text(width: int = 110) -> str:
    """One entry per option: ``strategy.<name> (default ...)`` and its description, indented."""
    entries = []
    for f in dataclasses.fields(PipelineOptions):
        head = f"strategy.{f.name} (default {shown_default(f.default)})"
        body = textwrap.fill(_plain(f.metadata["help"]), width, initial_indent="    ", subsequent_indent="    ")
        entries.append(f"  {head}\n{body}")
    return "\n".join(entries)


def _groups(*_: Any) -> str:
    """The config groups and their options, as Hydra lists them, without the hidden ones."""
    hydra = GlobalHydra.instance().hydra
    if hydra is None:
        return ""
    listed = hydra.format_config_groups(lambda group: group.split("/", 1)[0] not in _HIDDEN)
    return _escape(listed)


def _escape(text: str) -> str:
    """Text for Hydra's help template (a ``string.Template``: ``$`` must be doubled)."""
    return text.replace("$", "$$")


def help_config() -> dict[str, Any]:
    """The ``hydra/help`` node: Hydra's layout, with our groups and the strategy's options."""
    if not OmegaConf.has_resolver(_GROUPS_RESOLVER):
        OmegaConf.register_new_resolver(_GROUPS_RESOLVER, _groups)
    template = (
        "${hydra.help.header}\n"
        "== Configuration groups ==\n"
        "Compose your configuration from those groups (group=option)\n\n"
        f"${{{_GROUPS_RESOLVER}:}}\n"
        "== Strategy options (with strategy=bfpp) ==\n"
        "Set any of them on the command line (strategy.micro_batches=8)\n\n"
        f"{_escape(options_text())}\n\n"
        "== Config ==\n"
        "Override anything in the config (foo.bar=value)\n\n"
        "$CONFIG\n"
        "${hydra.help.footer}"
    )
    return {
        "app_name": "${hydra.job.name}",
        "header": "${hydra.help.app_name}: training with breadth-first pipeline parallelism (lightning_bfpp).\n",
        "footer": "Powered by Hydra (https://hydra.cc)\nUse --hydra-help to view Hydra specific help\n",
        "template": template,
    }
