"""One way to get an engine: every command and the Python API call `setup`, then its `load`.

It decides, from the files alone, which adapters a command uses and how the weights were tuned (an adapter's or an
export's card), so that the layout is settled before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from flashback.cards import (
    adapter_mode,
    adapter_tuned,
    export_tuned,
    for_endpoint,
    pick_slot,
    read_export_card,
    slot_mode,
)
from flashback.config import EngineConfig
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.layout import Tuned, layout_settings


@dataclass(frozen=True)
class Setup:
    """What a command runs, settled from the flags and the cards before anything loads: the engine's config, the
    adapter for each slot (cards.pick_slot), and the layout settings of the mode it lays out, for its endpoint and
    for chats (a server serves both). `load` then loads the engine."""

    cfg: EngineConfig
    adapters: dict[str, str]
    markers: bool
    tail: int
    chat_markers: bool
    chat_tail: int

    def load(self, markers: bool | None = None, context: int | None = None) -> Engine:
        """The engine, with the two marking tokens when `markers` (None: when the layout uses them); `context`:
        the positions an engine that sizes its cache up front must hold (llama.cpp; None: the config's)."""
        cfg = self.cfg if context is None else replace(self.cfg, context=context)
        return load_engine(cfg, adapters=self.adapters, markers=self.markers if markers is None else markers)


def setup(
    cfg: EngineConfig,
    mode: str = "append",
    modes: Sequence[str] | None = None,
    *,
    markers: bool | None = None,
    tail: int | None = None,
    adapters: bool = True,
    untuned_markers: bool | None = False,
    chat: bool | None = False,
) -> Setup:
    """Every command's (and FlashBack.load's) way from flags to an engine, for a command that runs `modes` (None:
    every mode) and lays out `mode`, for chats (`chat`), completions (False) or both (None: a server). The layout is
    what the user set (`markers`, `tail`), else what the weights were tuned with, else the defaults. `adapters`
    False: the bare model (or an export) whatever was shipped. `untuned_markers`: markers on in append mode when
    that layout was not tuned; None: on only when no layout was tuned at all (a bare model, as the paper lays it
    out)."""
    plan = plan_adapters(cfg, modes, chat) if adapters else {}
    tuned = tuned_layouts(cfg, plan)
    bare = not tuned if untuned_markers is None else untuned_markers
    main = layout_settings(for_endpoint(tuned, bool(chat)), mode, markers, tail, bare)
    chats = layout_settings(for_endpoint(tuned, True), mode, markers, tail, bare)
    return Setup(cfg, plan, *main, *chats)


def runs_export(cfg: EngineConfig) -> bool:
    """Whether the engine runs an export folder (adapter merged, layout in its card)."""
    return bool(cfg.upstream) or cfg.engine == "llamacpp" or read_export_card(cfg.model) is not None


def plan_adapters(cfg: EngineConfig, modes: Sequence[str] | None = None, chat: bool | None = None) -> dict[str, str]:
    """Slot -> adapter folder for a command that runs `modes` (None: every mode), for chats (`chat`), completions
    (False) or both (None): only the adapters that will serve its requests load.

    An export has its adapter merged: giving another is an error. An adapter given for a layout none of
    `modes` uses is an error too, never silently applied to another mode.
    """
    from flashback.engines.torch.adapters import plan_adapters as plan

    if runs_export(cfg):
        if cfg.adapters:
            raise FlashbackError(f"{cfg.model} is an export (its adapter is merged in): drop --adapter")
        return {}
    chosen = plan(cfg.model, list(cfg.adapters), no_default=not cfg.shipped_adapters)
    if chat is not None:  # the other endpoint's adapters stay unloaded, unless they serve this one too
        chosen = {slot: path for slot, path in chosen.items() if pick_slot(chosen, slot_mode(slot), chat) == slot}
    if modes is None:
        return chosen
    for path in cfg.adapters:
        trained = adapter_mode(path)
        if trained not in modes:
            raise FlashbackError(f"adapter {path} was trained for {trained} mode; --mode {modes[0]} does not use it")
    return {slot: path for slot, path in chosen.items() if slot_mode(slot) in modes}


def tuned_layouts(cfg: EngineConfig, adapters: dict[str, str]) -> dict[str, Tuned]:
    """Slot -> how the weights were tuned for its layout, read from the cards before anything loads."""
    card = read_export_card(cfg.model)
    if card is not None:
        return export_tuned(card)
    return {slot: adapter_tuned(path) for slot, path in adapters.items()}


def load_engine(cfg: EngineConfig, adapters: dict[str, str] | None = None, markers: bool = True) -> Engine:
    """The engine `cfg` names: an inference server upstream, llama.cpp on an export's GGUF, or PyTorch with
    `adapters` (slot -> folder, plan_adapters) and, if `markers`, the two marking tokens."""
    cfg.validate()
    if cfg.upstream:
        from flashback.engines.upstream import load_upstream

        return load_upstream(cfg.upstream, cfg.model)
    if cfg.engine == "llamacpp":
        from flashback.engines.llamacpp import load_llamacpp

        return load_llamacpp(cfg.model, n_ctx=cfg.context, threads=cfg.threads, flash_attn=cfg.flash_attn)
    from flashback.engines.torch import load_model

    engine = load_model(
        cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        markers=markers or bool(adapters),
        adapters=adapters,
        compile=cfg.compile,
        quantize=cfg.quantize,
    )
    card = read_export_card(cfg.model)
    if card is not None:  # an export on PyTorch: its card says how the merged weights were tuned
        engine.tuned = export_tuned(card)
    return engine
