"""Export a base model with a FlashBack adapter merged in, for inference engines.

vLLM and llama.cpp cannot take our adapter as it is: neither lets a LoRA add vocabulary rows, and the
two marking tokens are new rows. So the export is a plain Hugging Face model folder: the LoRA folded
into the weights, the marker rows in the embedding, the markers in the tokenizer (as special tokens,
so they keep their ids), and FlashBack's card (`flashback.json`) saying how the layout was trained.
Any engine that loads a transformers folder (vLLM, SGLang, transformers itself) serves it; the engines that run
an export read it in engines/exported.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from flashback.atomic import FolderKind, atomic_folder, check_output
from flashback.cards import EXPORT_FORMAT, adapter_endpoint, adapter_mode, adapter_tail, read_card
from flashback.config import GGUF_TYPES
from flashback.engines.native import INSTALL_LLAMA_CPP
from flashback.engines.torch.decode import merged_copy
from flashback.engines.torch.model import load_model
from flashback.errors import FlashbackError
from flashback.registry import cache_root

EXPORT_FOLDER = FolderKind(
    "FlashBack exported model",
    "flashback.json",
    EXPORT_FORMAT,
    frozenset(
        {
            "flashback.json",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
        }
    ),
    patterns=("model-*-of-*.safetensors", "*.gguf"),
)
# Types the converter cannot write: it writes f16, then llama.cpp's own quantizer (llama-cpp-python) takes over.
QUANTIZED_BY_LLAMA_CPP = {"q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""
# llama.cpp's converter ships in this source package (vendor/llama.cpp); it is fetched once into the cache.
LLAMA_CPP_SOURCE = "llama-cpp-python==0.3.36"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def gguf_converter() -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py (with its gguf-py), downloading it on first use."""
    root = cache_root() / "llama.cpp-converter" / LLAMA_CPP_SOURCE.split("==")[1]
    if (root / "convert_hf_to_gguf.py").exists():
        return root
    print(f"fetching llama.cpp's GGUF converter from the {LLAMA_CPP_SOURCE} source package (once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        if subprocess.run([*cmd, LLAMA_CPP_SOURCE], capture_output=True, text=True).returncode != 0:
            raise FlashbackError(f"could not download {LLAMA_CPP_SOURCE} (its source carries llama.cpp's converter)")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        staged = Path(tmp) / "converter"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/vendor/llama.cpp/")
                if member.isfile() and rest.startswith(_CONVERTER_PARTS):
                    member.name = rest
                    tar.extract(member, staged, filter="data")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staged, root)
    return root


def write_gguf(folder: Path, out_file: Path, outtype: str) -> None:
    """Convert a Hugging Face folder with llama.cpp's own converter (`outtype` checked by export, before the merge),
    then quantize with llama.cpp for the types the converter lacks."""
    if outtype in QUANTIZED_BY_LLAMA_CPP:
        f16 = out_file.with_name(out_file.name + ".f16.tmp")
        write_gguf(folder, f16, "f16")
        try:
            quantize_gguf(f16, out_file, outtype)
        finally:
            f16.unlink(missing_ok=True)
        return
    try:  # the converter tries a SentencePiece vocabulary first, whatever the tokenizer is
        import sentencepiece  # noqa: F401
    except ImportError:
        raise FlashbackError("--gguf needs sentencepiece: pip install 'flashback[engines]'") from None
    root = gguf_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])}
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype]
    done = subprocess.run([*cmd, "--outfile", str(out_file)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FlashbackError(f"llama.cpp's converter failed: {tail}")


def quantize_gguf(source: Path, out_file: Path, outtype: str) -> None:
    """llama.cpp's quantizer (what its llama-quantize tool runs), in a child process: it logs every tensor."""
    cmd = [sys.executable, "-c", _QUANTIZE, str(source), str(out_file), QUANTIZED_BY_LLAMA_CPP[outtype]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FlashbackError(f"llama.cpp's quantizer failed ({outtype}): {tail}")


def check_gguf_type(gguf: str | None) -> None:
    """Refuse a GGUF type that cannot be written here before any merging starts."""
    if gguf is not None and gguf not in GGUF_TYPES:
        raise FlashbackError(f"unknown GGUF type {gguf!r}; choose one of {', '.join(GGUF_TYPES)}")
    if gguf in QUANTIZED_BY_LLAMA_CPP and importlib.util.find_spec("llama_cpp") is None:
        raise FlashbackError(f"--gguf {gguf} needs llama-cpp-python: {INSTALL_LLAMA_CPP}")


def export(
    adapter: str | Path, out: str | Path, model: str | None = None, dtype: str = "float32", gguf: str | None = None
) -> dict:
    """Write the merged model to `out` (whole or nothing), with `gguf` also as `model-<type>.gguf`; return its card."""
    check_gguf_type(gguf)
    check_output(out, EXPORT_FOLDER)  # before the merge
    mode = adapter_mode(adapter)
    engine = load_model(model, dtype=dtype, markers=True, adapters={mode: str(adapter)})
    merged = merged_copy(engine.model, mode, engine.token_rows)
    source = read_card(adapter)
    card = {
        "format": EXPORT_FORMAT,
        "mode": mode,
        "endpoint": adapter_endpoint(adapter),  # what the merged adapter was trained to serve
        "markers": bool(source.get("markers", True)),
        "marker_ids": list(engine.marker_ids),
        "marker_tokens": engine.tokenizer.convert_ids_to_tokens(list(engine.marker_ids)),
        "tail": adapter_tail(adapter),
        "adapter": Path(adapter).resolve().name,  # its name only: an export may be copied to other machines
        "base_model": engine.name,
        "dtype": dtype,
        "gguf": f"model-{gguf}.gguf" if gguf else None,
    }
    with atomic_folder(out, EXPORT_FOLDER) as tmp:
        merged.save_pretrained(tmp)
        engine.tokenizer.save_pretrained(tmp)
        if gguf:
            write_gguf(tmp, tmp / card["gguf"], gguf)
        (tmp / "flashback.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
