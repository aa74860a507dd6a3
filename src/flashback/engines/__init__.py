"""Engines: what runs the model. `base` is the seam (Engine, Session, Capabilities); `load` picks one.

- torch/     transformers models, per-mode LoRA adapters, a rollback-able KV cache, a compiled decode step
- llamacpp   an exported GGUF in process (llama-cpp-python)
- upstream/  an inference server (llama-server, vLLM) over HTTP, one request per stretch
"""

from flashback.engines.base import Capabilities, Engine, Session
from flashback.engines.load import load_engine

__all__ = ["Capabilities", "Engine", "Session", "load_engine"]
