"""The PyTorch engine: a transformers causal LM with its tokenizer, the marking tokens, and LoRA adapters per mode.

Sessions are KV caches (cache.py); single-token steps may go through a compiled or int8 decode step
(decode.py). This module does not touch the KV cache itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashback.cards import adapter_tuned, pick_slot
from flashback.config import DTYPES, QUANTIZE, compile_setting
from flashback.engines.base import Architecture, Capabilities, Engine, SessionSpec
from flashback.errors import FlashbackError, first_line
from flashback.registry import DEFAULT_MODEL, resolve_model_path
from flashback.text.tokenize import MARKERS, load_tokenizer

CAPACITY_STEP = 512  # compiled decode steps have one graph per cache capacity: capacities are rounded to this


def _capacity(positions: int) -> int:
    """A fixed buffer's size for `positions` tokens: rounded up, so that few compiled graphs serve all lengths."""
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


class TorchEngine(Engine):
    capabilities = Capabilities(logits="all", adapters=True)
    kind = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str,
        device: torch.device,
        marker_ids: tuple[int, int] | None = None,
        adapters: dict[str, str] | None = None,
        compile: str | bool = "off",
        quantize: str | None = None,
        token_rows=None,
    ):
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, torch.device(device)
        self.marker_ids = marker_ids
        self._adapters = dict(adapters or {})  # slot (cards.pick_slot) -> adapter folder; peft's adapter name = slot
        self.compile = compile_setting(compile)  # on, off, or auto (autocompile.py): the decode step (decode.py)
        self.quantize = quantize  # decode weights: None (as loaded) or "int8"
        self.tuned = {slot: adapter_tuned(path) for slot, path in self._adapters.items()}
        self._active = next(iter(self._adapters), None)  # PeftModel activates the first adapter it loads
        self._decoders: dict = {}
        self.token_rows = token_rows  # the adapters' marker rows, outside PEFT (adapters.TokenRows)
        self.prefixes = None  # a prefixes.PrefixStore: finished sequences kept for later requests (serve --cache-mb)
        self.later_decode_tokens = 0  # --compile auto: what later generations in this process will decode (bench)
        self.warming: set[tuple[str | None, int]] = set()  # (adapter, capacity) graphs compiling in the background
        if token_rows:
            token_rows.write(self.model, self._active)

    @property
    def adapters(self) -> dict[str, str]:
        return self._adapters

    @property
    def arch(self) -> Architecture:
        return Architecture.of(self.model)

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype)

    @property
    def kv_value_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling decode steps so far in this process."""
        return sum(d.compile_s for d in self._decoders.values())

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def eos_ids(self) -> set[int]:
        eos = self.model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {int(eos)}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "compile": self.compile,
            "quantize": self.quantize,
            "compile_s": self.compile_s,
        }

    def session(self, spec: SessionSpec = SessionSpec()):  # noqa: B008 - frozen
        """A KV cache whose forwards run with the adapter of `spec.mode` for its endpoint (chat or not). Given
        `positions` (a generation's most), single tokens go through the decode step when one is asked for (--compile
        on / --quantize), over a buffer of that many positions rounded up; with --compile auto, when the
        `decode_tokens` the generation expects repay the compile (autocompile.py). `scoring` with --quantize runs
        every forward on the decode weights: what the quantization costs in perplexity."""
        from flashback.engines.torch.cache import KVCache

        positions = spec.positions
        adapter = pick_slot(self._adapters, spec.mode, spec.chat)  # the keys and values depend on it
        if spec.scoring and self.quantize:
            return KVCache(self.decoder(adapter).model, self.device)
        capacity = _capacity(positions) if positions is not None else None
        decoder = self.decoder(adapter) if positions is not None else None
        auto = None
        if decoder is None and capacity is not None and self.compile == "auto" and spec.decode_tokens:
            auto = self._auto(adapter, capacity, spec.decode_tokens)
        prefixes = None if spec.scoring else self.prefixes
        return KVCache(
            self.model,
            self.device,
            capacity if decoder is not None else None,
            decoder,
            lambda: self.activate(adapter),
            prefixes,
            (adapter, spec.salt),
            auto,
        )

    def _auto(self, adapter: str | None, capacity: int, decode_tokens: int):
        from flashback.engines.torch.autocompile import AutoCompile, Records, use_inductor_cache

        use_inductor_cache()
        return AutoCompile(
            self._graph_key(adapter, capacity),
            capacity,
            decode_tokens,
            lambda: self.decoder(adapter, build=True),
            lambda: adapter in self._decoders and capacity in self._decoders[adapter].capacities,
            Records(),
            self.later_decode_tokens,
            busy=lambda: bool(self.warming),  # one thread compiles at a time: the warm-up's
        )

    def _graph_key(self, adapter: str | None, capacity: int) -> str:
        from flashback.engines.torch.autocompile import graph_key

        return graph_key(self.name, adapter, capacity, self.device, self.dtype_name)

    def warming_up(self) -> list[int]:
        return sorted(capacity for _, capacity in set(self.warming))

    def warm_up(self, mode: str | None, capacities: Sequence[int]):
        """Compile `mode`'s decode steps (its text and chat adapters') for each capacity in a background thread, so
        that requests find the graphs built (--compile auto then switches to them at no cost). Meanwhile auto
        sessions stay eager, so that only this thread compiles. With --compile on the graphs are those its sessions
        decode on (a bench compiles the long contexts' this way, without a warm-up prefill); off never compiles."""
        import threading

        if self.compile == "off" or self.quantize:
            return None
        from flashback.engines.torch.autocompile import remember_failure, use_inductor_cache

        use_inductor_cache()
        slots = list(dict.fromkeys(pick_slot(self._adapters, mode, chat) for chat in (False, True)))  # both endpoints'
        sizes = sorted({_capacity(c) for c in capacities})
        self.warming.update((adapter, c) for adapter in slots for c in sizes)

        def work() -> None:
            from flashback.engines.torch.cache import KVCache

            for adapter in slots:
                for capacity in sizes:
                    try:
                        decoder = self.decoder(adapter, build=True)
                        cache = KVCache(decoder.model, self.device, capacity, decoder)
                        cache.extend(self.head_ids or [0])  # eager, on the decode step's own merged weights
                        cache.extend([0])  # the step: compiles this capacity's graph
                    except Exception as exc:  # noqa: BLE001 - a failed compile leaves requests eager, as in auto
                        remember_failure(self._graph_key(adapter, capacity), exc)
                    finally:
                        self.warming.discard((adapter, capacity))

        thread = threading.Thread(target=work, name="flashback-warm-up", daemon=True)
        thread.start()
        return thread

    def keep_prefixes(self, budget_mb: float) -> None:
        """Keep finished sequences' caches, up to `budget_mb` of buffers, for requests that start alike."""
        from flashback.engines.torch.prefixes import PrefixStore

        self.prefixes = PrefixStore(int(budget_mb * 2**20)) if budget_mb > 0 else None

    def forget(self) -> None:
        if self.prefixes is not None:
            self.prefixes.clear()

    def decode_weight_bytes(self, mode: str | None) -> int:
        """Weight bytes one decode step reads: every linear layer (the decode step's own, int8 with --quantize)
        and one embedding row; a tied output matrix counts once, as the output layer."""
        decoder = self.decoder(mode)
        if decoder is not None:
            return decoder.weight_bytes()
        linears = {id(m.weight): m.weight for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        emb = self.model.get_input_embeddings().weight
        return sum(w.numel() * w.element_size() for w in linears.values()) + emb.shape[1] * emb.element_size()

    def decoder(self, slot: str | None, build: bool = False):
        """The decode step for an adapter slot (a text adapter's is its mode; that adapter merged; the base model for
        a slot without one), or None when decoding stays on the eager model (--compile off or auto, without
        --quantize, unless `build`: auto chose to compile)."""
        if not (self.compile == "on" or self.quantize or build):
            return None
        adapter = slot if slot in self._adapters else None
        if adapter not in self._decoders:
            from flashback.engines.torch.decode import Decoder

            compile = self.compile != "off" or build
            decoder = Decoder(self.model, adapter, self.quantize, compile, self.token_rows)
            if self.compile == "on" and not self.quantize:  # auto records its own compiles, in its own terms
                from flashback.engines.torch.autocompile import remember_compile

                decoder.on_compile = lambda capacity, s: remember_compile(self._graph_key(adapter, capacity), s)
            self._decoders[adapter] = decoder
        return self._decoders[adapter]

    def activate(self, slot: str | None) -> None:
        """Switch the model to the adapter of `slot` (a text adapter's is its mode), or to the bare base model.

        Called before every eager forward, so interleaved requests of different modes and endpoints on one model
        (the server) each run with their own adapter. A no-op when nothing changes.
        """
        if not self._adapters:
            return
        want = slot if slot in self._adapters else None
        if want == self._active:
            return
        if want is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(want)
        if self.token_rows:
            self.token_rows.write(self.model, want)
        self._active = want


def add_marker_tokens(model, tokenizer) -> tuple[int, int]:
    """Add <MARK_L>/<MARK_R> if missing and return their ids (looked up, never assumed)."""
    missing = [m for m in MARKERS if m not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    ids = tuple(tokenizer.convert_tokens_to_ids(m) for m in MARKERS)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        # Deterministic start for the new rows: the mean embedding (the default samples randomly).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[rows:] = weight[:rows].mean(dim=0)
    return ids  # type: ignore[return-value]


def load_model(
    name: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    markers: bool = False,
    adapters: dict[str, str] | None = None,
    compile: str | bool = "off",
    quantize: str | None = None,
) -> TorchEngine:
    """Load model + tokenizer; add marking tokens when asked or when an adapter needs them.

    `adapters` maps slots (a mode, or MODE-chat) to adapter folders (adapters.plan_adapters).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise FlashbackError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise FlashbackError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    try:
        torch.device(device)
    except RuntimeError:
        raise FlashbackError(f"unknown --device {device!r}; choose cpu, cuda, cuda:N or mps") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlashbackError("--device cuda was asked for but no CUDA device is available")
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise FlashbackError(f"cannot load model from {path!r}: {first_line(exc)}") from None
    plan = dict(adapters or {})
    marker_ids = add_marker_tokens(model, tokenizer) if (markers or plan) else None
    rows = None
    if plan:
        from flashback.engines.torch.adapters import TokenRows, attach_adapters

        model = attach_adapters(model, tokenizer, plan, base_name=name or DEFAULT_MODEL)
        rows = TokenRows.fold(model)
    model.to(device).eval()
    return TorchEngine(
        model,
        tokenizer,
        name or DEFAULT_MODEL,
        torch.device(device),
        marker_ids,
        plan,
        compile,
        quantize,
        rows,
    )
