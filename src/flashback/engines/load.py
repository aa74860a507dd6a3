"""One way to get an engine: the CLI, the Python API, the server and the bench all call `load_engine`.

It also decides, from the files alone, which adapters a command uses and how the weights were tuned
(an adapter's or an export's card), so that the layout can be settled before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence

from flashback.cards import adapter_position, adapter_tuned, export_tuned, read_export_card
from flashback.config import EngineConfig
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.layout import Tuned


def runs_export(cfg: EngineConfig) -> bool:
    """Whether the engine runs an export folder (adapter merged, layout in its card)."""
    return bool(cfg.upstream) or cfg.engine == "llamacpp" or read_export_card(cfg.model) is not None


def plan_adapters(cfg: EngineConfig, modes: Sequence[str] | None = None) -> dict[str, str]:
    """Mode -> adapter folder for a command that runs `modes` (None: every mode).

    An export has its adapter merged: giving another is an error. An adapter given for a layout none of
    `modes` uses is an error too, never silently applied to another mode.
    """
    from flashback.engines.torch.adapters import plan_adapters as plan

    if runs_export(cfg):
        if cfg.adapters:
            raise FlashbackError(f"{cfg.model} is an export (its adapter is merged in): drop --adapter")
        return {}
    chosen = plan(cfg.model, list(cfg.adapters), no_default=not cfg.shipped_adapters)
    if modes is None:
        return chosen
    for path in cfg.adapters:
        trained = adapter_position(path)
        if trained not in modes:
            raise FlashbackError(f"adapter {path} was trained for {trained} mode; --mode {modes[0]} does not use it")
    return {mode: path for mode, path in chosen.items() if mode in modes}


def tuned_layouts(cfg: EngineConfig, adapters: dict[str, str]) -> dict[str, Tuned]:
    """Mode -> how the weights were tuned for its layout, read from the cards before anything loads."""
    card = read_export_card(cfg.model)
    if card is not None:
        return export_tuned(card)
    return {mode: adapter_tuned(path) for mode, path in adapters.items()}


def load_engine(cfg: EngineConfig, adapters: dict[str, str] | None = None, markers: bool = True) -> Engine:
    """The engine `cfg` names: an inference server upstream, llama.cpp on an export's GGUF, or PyTorch with
    `adapters` (mode -> folder, plan_adapters) and, if `markers`, the two marking tokens."""
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
