"""The single-token decode step, laid out for memory bandwidth.

Decoding one token reads every weight once and does two FLOPs per weight, so its time is bytes moved
over memory bandwidth. Eager PyTorch falls short of that on CPU: MKL's matrix-vector kernels stream
fp32 weights at under half the machine's copy bandwidth, and each of the ~700 small ops of a step
pays Python dispatch. This module builds a second view of the model for the decode step only:

- every nn.Linear becomes a `DecodeLinear` whose weight is fp32 (shared with the model) or int8 with
  one scale per output row (`quantize="int8"`); LoRA adapters are merged first, one copy per mode;
- under torch.compile the single-token product is written as multiply-and-sum, which Inductor turns
  into one fused, vectorised pass over the weight (about 2x MKL's speed here); attention over the
  fixed-shape KV buffers (cache.FixedLayer) is written the same way, in blocks of keys;
- prefill and extend keep running on the eager model: they are compute-bound and fast already.
"""

from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn
from torch.nn import functional as F

from flashback.config import QUANTIZE
from flashback.errors import FlashbackError

ATTENTION = "fixed_kv_decode"  # a name with "flash" in it would send transformers looking for a kernel


class DecodeLinear(nn.Module):
    """y = x Wᵀ (+ b) with W in fp32/bf16, or int8 with per-row scales (weight-only quantization)."""

    def __init__(self, linear: nn.Linear, quantize: str | None):
        super().__init__()
        w = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        if quantize == "int8":
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            self.weight = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.scale = scale.to(w.dtype)
        elif quantize is None:
            self.weight, self.scale = w, None  # shared with the model, no copy
        else:
            raise FlashbackError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)  # a no-op for float weights; fused into the product when compiled
        if x.shape[-2] == 1 and x.device.type == "cpu" and torch.compiler.is_compiling():
            y = (x.unsqueeze(-2) * w).sum(-1)  # one streaming pass over W
        else:
            y = F.linear(x, w)
        if self.scale is not None:
            y = y * self.scale
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + sum(t.numel() * t.element_size() for t in (self.scale, self.bias) if t is not None)


KV_BLOCK = 256  # keys per block of the CPU decode attention; generate's capacities are multiples of 512


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one query over the whole fixed-shape cache, masked past the filled length.

    Grouped-query heads share their key/value head without copies. On the CPU, compiled, the keys are cut into
    blocks (`blocked_attention`); on CUDA (CUDA graphs, checked on an H100) scores and the weighted sum are each
    one pass over the keys and values. Anything but a single query goes to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    if q_len != 1 or not torch.compiler.is_compiling():
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else dim**-0.5
    if query.device.type == "cpu":
        if key.shape[2] % KV_BLOCK == 0:
            return blocked_attention(query, key, value, attention_mask, scale), None
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2), None
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, 1, dim)  # (b, kv, group, 1, d)
    scores = (q * key[:, :, None]).sum(-1, dtype=torch.float32) * scale  # (b, kv, group, C)
    if attention_mask is not None:  # bool, True = attend, (b, 1, 1, C)
        scores = scores.masked_fill(~attention_mask[:, :, None, 0], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = (probs[..., None] * value[:, :, None]).sum(-2)  # (b, kv, group, d)
    return out.reshape(b, heads, 1, dim).transpose(1, 2), None


def blocked_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """Single-query attention written so that Inductor's CPU loops read each key and value once.

    query (b, heads, 1, d); key, value (b, kv, C, d) with C a multiple of KV_BLOCK; mask bool (b, 1, 1, C) or
    None. Returns (b, 1, heads, d). Scores are laid out (kv head, block, group, key): every (kv head, block) is
    one work item whose keys, then values (64 KB each for 64-wide fp32 heads), stay in L2 while each query head of
    the group uses them. Without the block dimension Inductor loops over the query heads outside the keys and
    streams the cache from memory once per head; SDPA's CPU kernel also reads it well below the copy bandwidth.
    The softmax is taken over both block dimensions at once.
    """
    b, heads, _, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    group, blocks = heads // kv_heads, capacity // KV_BLOCK
    q = query.view(b, kv_heads, 1, group, 1, dim)
    scores = (q * key.view(b, kv_heads, blocks, 1, KV_BLOCK, dim)).sum(-1) * scale  # (b, kv, blocks, group, B)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, blocks, 1, KV_BLOCK), float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=(2, 4), keepdim=True))
    out = (weights[..., None] * value.view(b, kv_heads, blocks, 1, KV_BLOCK, dim)).sum(-2).sum(2)  # (b, kv, group, d)
    out = out / weights.sum(dim=(2, 4))[..., None]
    return out.reshape(b, 1, heads, dim)


def _register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def merged_copy(model: nn.Module, adapter: str | None, token_rows=None) -> nn.Module:
    """The plain model with `adapter` (a PEFT adapter name) merged in, or with adapters removed; its embedding
    rows from `token_rows` (adapters.TokenRows) when the adapters' trained rows were folded out of PEFT.

    Without PEFT adapters the copy shares every weight with `model`.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    peft = copy.deepcopy(model)
    if adapter is None:
        plain = peft.unload()
    else:
        peft.base_model.enable_adapter_layers()
        peft.set_adapter(adapter)
        plain = peft.merge_and_unload(adapter_names=[adapter])
    if token_rows:
        token_rows.write(plain, adapter)
    return plain


def swap_linears(module: nn.Module, quantize: str | None) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, DecodeLinear(child, quantize))
        else:
            swap_linears(child, quantize)


class Decoder:
    """One token onto a KV cache of FixedLayers: eager or compiled, fp32 or int8 weights.

    `compile_s` is the time of the first call(s) that compiled (paid once per process and shape).
    """

    def __init__(self, model: nn.Module, adapter: str | None, quantize: str | None, compile: bool, token_rows=None):
        _register_attention()
        self.model = merged_copy(model, adapter, token_rows)
        swap_linears(self.model, quantize)
        self.model.set_attn_implementation(ATTENTION)
        self.model.eval()
        self.quantize = quantize
        self.compiled = compile
        self.compile_s = 0.0
        self.capacities: set[int] = set()  # cache capacities whose graph this process has compiled
        self.on_compile = None  # called with (capacity, seconds) after a call that compiled (--compile on: records)
        if compile:
            from flashback.engines.torch.autocompile import use_inductor_cache

            use_inductor_cache()
        # On CUDA a step of a small model is mostly kernel launches: replay it as one CUDA graph. Set
        # FLASHBACK_CUDA_GRAPHS=0 to compile without graphs (to compare, or if a driver misbehaves).
        device = next(self.model.parameters()).device
        self.cuda_graphs = compile and device.type == "cuda" and os.environ.get("FLASHBACK_CUDA_GRAPHS", "1") != "0"
        # Static shapes: one graph per cache capacity (generate rounds it up to 512 tokens). Dynamic shapes would
        # serve every capacity with one graph, but Inductor's CPU code generation for them takes many minutes.
        mode = "reduce-overhead" if self.cuda_graphs else None
        # On the CPU, Inductor would inline the query's rotary embedding (its sin and cos) into the attention's
        # score loop and recompute it for every key; this threshold makes it store the rotated query first.
        options = {"realize_opcount_threshold": 8} if device.type == "cpu" else None
        self._step = (
            torch.compile(self._forward, dynamic=False, mode=mode, options=options) if compile else self._forward
        )
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

    def _forward(self, input_ids, position_ids, cache):
        return self.model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True).logits

    def weight_bytes(self) -> int:
        """Bytes a decode step reads from weights: every linear layer plus one embedding row."""
        linears = sum(m.weight_bytes() for m in self.model.modules() if isinstance(m, DecodeLinear))
        emb = self.model.get_input_embeddings().weight
        return linears + emb.shape[1] * emb.element_size()

    @torch.inference_mode()
    def __call__(self, cache, token: int, device: torch.device, capacity: int | None = None) -> torch.Tensor:
        """Logits after `token`, written at the cache layers' shared `position` tensor (already set); `capacity` is
        the session's (sliding-window layers have buffers of their own size)."""
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
        pos = cache.layers[0].position.view(1, 1)
        if self.cuda_graphs:
            _mark_static_buffers(cache)
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are no longer read
        graphs = _graphs_compiled()
        start = time.perf_counter()
        logits = self._step(ids, pos, cache)
        capacity = capacity or max(layer._k.shape[-2] for layer in cache.layers)
        if _graphs_compiled() != graphs:  # this call compiled (first call, or a new cache shape)
            seconds = time.perf_counter() - start
            self.compile_s += seconds
            if self.on_compile is not None:
                self.on_compile(capacity, seconds)
        if self.compiled:
            self.capacities.add(capacity)
        logits = logits[0, -1].float()
        return logits.clone() if self.cuda_graphs else logits  # a graph's output is overwritten by its next replay


def _mark_static_buffers(cache) -> None:
    """Let a CUDA graph write the KV buffers in place: their addresses are fixed for the cache's lifetime.

    Unguarded, so a new cache (new buffers) re-records the graph instead of recompiling it.
    """
    for layer in cache.layers:
        for buffer in (layer._k, layer._v, layer.position):
            if buffer is not None and not getattr(buffer, "_flashback_static", False):
                torch._dynamo.mark_static_address(buffer, guard=False)
                buffer._flashback_static = True


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
