"""Decoding on an inference server (llama-server, vLLM) while retrieval and the layout stay here."""

from flashback.engines.upstream.clients import Completion, OpenAIClient, llama_server_path, vllm_python
from flashback.engines.upstream.engine import UpstreamEngine, UpstreamSession, load_upstream

__all__ = [
    "Completion",
    "OpenAIClient",
    "UpstreamEngine",
    "UpstreamSession",
    "llama_server_path",
    "load_upstream",
    "vllm_python",
]
