"""The PyTorch engine: transformers models with per-mode LoRA adapters, a rollback-able KV cache, and a
compiled decode step."""

from flashback.engines.torch.model import TorchEngine, load_model

__all__ = ["TorchEngine", "load_model"]
