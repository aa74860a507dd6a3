"""Runtime of append (FlashBack) vs prepend (In-Context RALM) generation across context lengths.

For each context length both modes generate the same number of tokens with the same retrieval
schedule; runs are interleaved (the order alternates each repeat) after a warm-up, and medians are
reported. Beside each measured speedup stands the FLOP-model limit, computed from the forward
passes the two runs actually made, so a reader sees how close the implementation gets.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flashback.data import DEFAULT_TAIL
from flashback.errors import FlashbackError
from flashback.generate import GenerationConfig, IndexRetriever, Retrieved, generate
from flashback.model import LoadedModel
from flashback.retrieval import Hit, Index
from flashback.train import lora_targets


@dataclass(frozen=True)
class BenchConfig:
    context_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    new_tokens: int = 128
    stride: int = 16
    passage_tokens: int = 128
    query_tokens: int = 32
    k: int = 1
    repeats: int = 3
    markers: bool = True
    tail: int = DEFAULT_TAIL  # append: context tokens re-encoded after the passage at each retrieval
    lora_overhead: bool = True  # also time an unmerged LoRA adapter vs merged weights
    lora_targets: tuple[str, ...] = ("all-linear",)  # as `train --target-modules`; the shipped adapter's
    seed: int = 0


class RandomRetriever:
    """Random-token passages: measures the model side alone when no index is given."""

    def __init__(self, vocab_size: int, passage_tokens: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.max_passage_tokens = passage_tokens

    def __call__(self, query: str, k: int) -> list[Retrieved]:
        return [
            Retrieved(
                Hit(-1, f"random#{i}", "random", "", 0.0),
                self.rng.integers(0, self.vocab_size, self.max_passage_tokens, dtype=np.int64),
            )
            for i in range(k)
        ]


class FullRetriever:
    """Index passages, k at every step: a query that matches nothing (generated text can be all punctuation)
    gets seeded random full-length passages of the same index, so that every retrieval step costs what the
    layout costs. `filled` counts them; the bench reports it."""

    def __init__(self, index: Index, seed: int = 0):
        self.search = IndexRetriever(index)
        self.index = index
        self.max_passage_tokens = index.chunk_tokens
        self.rng = np.random.default_rng(seed)
        self.full = np.flatnonzero(np.diff(index.offsets) == index.chunk_tokens)
        self.filled = 0

    def __call__(self, query: str, k: int) -> list[Retrieved]:
        got = self.search(query, k)
        while len(got) < k:
            i = int(self.rng.choice(self.full))
            m = self.index.meta[i]
            got.append(Retrieved(Hit(i, m["id"], m["doc_id"], m["title"], 0.0), self.index.passage_tokens(i)))
            self.filled += 1
        return got


def flops(model: torch.nn.Module, n: int, cached: int) -> float:
    """FLOP model of one forward of n new tokens over `cached` tokens (logits for the last one only).

    2·P·n for the weights (P without the embedding lookup) + 4·layers·width·(n·c + n²/2) for attention.
    """
    cfg = model.config
    width, layers = cfg.hidden_size, cfg.num_hidden_layers
    emb = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - emb * (1 if cfg.tie_word_embeddings else 2)
    return 2 * body * n + 2 * emb + 4 * layers * width * (n * cached + n * n / 2)


def trace_flops(model, forwards) -> float:
    return sum(flops(model, f.tokens, f.cache_len - f.tokens) for f in forwards)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes per second of a tensor copy far larger than any cache (read + write counted), median of `repeats`
    (the best of many copies of 256 MB once read 64 GB/s where the median was 36)."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decode_bytes(lm: LoadedModel, mode: str) -> tuple[int, int]:
    """(weight bytes, KV bytes per cached token) one decode step reads, on lm's engine."""
    cfg = lm.model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return lm.decode_weight_bytes(mode), 2 * cfg.num_hidden_layers * heads * head_dim * lm.kv_value_bytes


def context_tokens(lm: LoadedModel, length: int, index: Index | None, seed: int) -> list[int]:
    """Real text (consecutive index passages) when an index is given, else random tokens."""
    if index is not None:
        ids = index.token_ids[:length].tolist()
        if len(ids) < length:
            raise FlashbackError(f"the index holds fewer than {length} tokens for a context")
        return ids
    rng = np.random.default_rng(seed)
    return rng.integers(0, len(lm.tokenizer) - 2, length).tolist()


def _run(lm, context, retriever, cfg: GenerationConfig) -> dict:
    if lm.engine == "upstream":  # a new context for the engine, as in the local engines' runs: nothing cached
        lm.forget()
    _sync(lm.device)
    t0 = time.perf_counter()
    result = generate(lm, context, retriever, cfg)
    _sync(lm.device)
    wall = time.perf_counter() - t0
    trace = result.trace
    if len(result.token_ids) != cfg.max_new_tokens or trace.dropped_prompt_tokens:
        raise FlashbackError("benchmark run was cut short (context too long for the model?)")
    if any(r.get("skipped") for r in trace.retrievals):
        raise FlashbackError("a benchmark retrieval step went without passages: its timing would not be a step")
    multi = [f for f in trace.forwards if f.kind != "decode"]
    decodes = [f for f in trace.forwards if f.kind == "decode"]
    # KV tokens a decode step reads: the filled cache (eager), or the whole fixed buffer, masked (Decoder)
    kv_read = trace.cache_capacity or statistics.mean(f.cache_len - 1 for f in decodes)
    # Forwards before the first token: the context prefill (+ the first passage in append mode; an upstream
    # engine computes both in its first request).
    first = multi[:2] if cfg.mode == "append" and lm.engine != "upstream" else multi[:1]
    first_s = sum(f.seconds for f in first) + trace.retrieval_s / max(1, len(trace.retrievals))
    return {
        "wall_s": wall,
        **trace.timings(),
        "retrievals": len(trace.retrievals),
        "kv_tokens_read": kv_read,
        "retrieval_records": trace.retrievals,
        # an upstream engine's own count of prompt tokens it computed and reused from its prefix cache
        "engine_prompt_tokens": sum(f.tokens for f in multi),
        "engine_cached_tokens": sum(r.get("engine_cached_tokens", 0) for r in trace.retrievals),
        # retrieval steps after the first: the first one includes the context prefill in both modes
        "step_s": [f.seconds for f in multi[len(first) :]],
        "retrieval_each_s": trace.retrieval_s / max(1, len(trace.retrievals)),
        "flops": trace_flops(lm.model, trace.forwards),
        "after_first_s": wall - first_s,
        "after_first_flops": trace_flops(lm.model, trace.forwards) - trace_flops(lm.model, first),
    }


def bare_extend_seconds(lm: LoadedModel, context: list[int], n: int, repeats: int) -> float:
    """Median time of one forward of n tokens against the context's cache, then rolled back."""
    cache = lm.new_cache()
    cache.extend(context)
    times = []
    for r in range(repeats):
        ids = context[r : r + n]  # new tokens each time: an engine with a prefix cache must not find them cached
        t0 = time.perf_counter()
        cache.extend(ids)
        _sync(lm.device)
        times.append(time.perf_counter() - t0)
        cache.rollback(len(context))
    return statistics.median(times)


def decode_bound(lm: LoadedModel, mode: str, kv_tokens: float, bandwidth: float) -> dict:
    """Bandwidth bound of one decode step: the bytes it must read over the measured copy bandwidth."""
    weights, per_token = decode_bytes(lm, mode)
    return {
        "weight_mb": weights / 1e6,
        "kv_mb": per_token * kv_tokens / 1e6,
        "weights_bound_ms": 1000 * weights / bandwidth,
        "bound_ms": 1000 * (weights + per_token * kv_tokens) / bandwidth,
    }


def _summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(
    lm: LoadedModel, bc: BenchConfig, index: Index | None = None, progress: Callable[[str], None] = lambda s: None
) -> dict:
    retriever = (
        FullRetriever(index, bc.seed)
        if index is not None
        else RandomRetriever(len(lm.tokenizer) - 2, bc.passage_tokens, bc.seed)
    )
    passage = retriever.max_passage_tokens
    markers = bc.markers and lm.marker_ids is not None
    if bc.new_tokens <= bc.stride:
        raise FlashbackError(
            f"--new-tokens ({bc.new_tokens}) must exceed --stride ({bc.stride}): the bench times the retrieval "
            "steps after the first"
        )
    progress("measuring memory-copy bandwidth")
    bandwidth = copy_bandwidth(lm.device)
    rows = []
    for length in bc.context_lengths:
        if length + bc.new_tokens + bc.k * passage + 2 > lm.max_positions:
            raise FlashbackError(f"context length {length} does not fit the model's {lm.max_positions} positions")
        context = context_tokens(lm, length, index, bc.seed)
        cfgs = {
            m: GenerationConfig(
                mode=m,
                stride=bc.stride,
                query_tokens=bc.query_tokens,
                k=bc.k,
                max_new_tokens=bc.new_tokens,
                markers=markers,
                tail=bc.tail,
                stop_at_eos=False,
            )
            for m in ("append", "prepend")
        }
        progress(f"L={length}: warm-up")
        for mode in cfgs:
            _run(lm, context, retriever, cfgs[mode])
        runs: dict[str, list[dict]] = {"append": [], "prepend": []}
        for r in range(bc.repeats):
            for mode in ("append", "prepend") if r % 2 == 0 else ("prepend", "append"):
                progress(f"L={length}: {mode} run {r + 1}/{bc.repeats}")
                runs[mode].append(_run(lm, context, retriever, cfgs[mode]))
        step_tokens = bc.stride + bc.tail + bc.k * passage + 2 * markers  # what an append retrieval step encodes
        bare = bare_extend_seconds(lm, context, step_tokens, max(3, bc.repeats))
        row = {"context_length": length, "new_tokens": bc.new_tokens}
        for mode, rs in runs.items():
            wall = _summary([x["wall_s"] for x in rs])
            row[mode] = {
                "wall_s": wall,
                "tokens_per_s": bc.new_tokens / wall["median"],
                "breakdown_s": {
                    k: statistics.median(x[k] for x in rs) for k in ("retrieval_s", "prefill_s", "extend_s", "decode_s")
                },
                "retrieval_step_s": statistics.median(s + x["retrieval_each_s"] for x in rs for s in x["step_s"]),
                "decode_ms_per_token": 1000
                * statistics.median(x["decode_s"] for x in rs)
                / (bc.new_tokens - rs[0]["retrievals"]),
                "decode_share": statistics.median(x["decode_s"] / x["wall_s"] for x in rs),
                **decode_bound(lm, mode, rs[0]["kv_tokens_read"], bandwidth),
                "flops": rs[0]["flops"],
                "after_first_s": statistics.median(x["after_first_s"] for x in rs),
                "after_first_flops": rs[0]["after_first_flops"],
            }
            if lm.engine == "upstream":
                row[mode]["engine_prompt_tokens"] = rs[0]["engine_prompt_tokens"]
                row[mode]["engine_cached_tokens"] = rs[0]["engine_cached_tokens"]
        a, p = row["append"], row["prepend"]
        row["speedup"] = p["wall_s"]["median"] / a["wall_s"]["median"]
        row["flop_limit_speedup"] = p["flops"] / a["flops"]
        row["after_first_speedup"] = p["after_first_s"] / a["after_first_s"]
        row["after_first_flop_limit"] = p["after_first_flops"] / a["after_first_flops"]
        row["step_speedup"] = p["retrieval_step_s"] / a["retrieval_step_s"]
        row["step_flop_limit"] = flops(lm.model, length + bc.k * passage, 0) / flops(lm.model, step_tokens, length)
        row["append_step_tokens"] = statistics.median(
            r["computed_tokens"] for r in runs["append"][0]["retrieval_records"][1:]
        )
        for mode in ("append", "prepend"):
            row[mode]["decode_over_bound"] = row[mode]["decode_ms_per_token"] / row[mode]["bound_ms"]
        row["bare_extend_s"] = bare
        row["append_step_over_bare"] = a["retrieval_step_s"] / bare
        rows.append(row)
        progress(f"L={length}: speedup {row['speedup']:.2f}x (FLOP limit {row['flop_limit_speedup']:.2f}x)")
    out = {
        "model": lm.name,
        "device": str(lm.device),
        "engine": lm.engine,
        "dtype": lm.dtype_name,
        "threads": torch.get_num_threads(),
        "passages": "index" if index is not None else "random tokens",
        "compile": lm.compile,
        "quantize": lm.quantize,
        "compile_s": lm.compile_s,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "config": bc.__dict__,
        "rows": rows,
        **({"engine_counts_cached": lm.client.reports_cached_tokens} if lm.engine == "upstream" else {}),
    }
    if bc.lora_overhead and isinstance(lm, LoadedModel):  # LoRA on PyTorch weights only
        out["lora"] = lora_overhead(lm, bc, retriever, progress)
    if isinstance(retriever, FullRetriever):  # queries that matched nothing, filled with random index passages
        out["filled_passages"] = retriever.filled
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if lm.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(lm.device) / 2**20
    return out


def lora_overhead(lm: LoadedModel, bc: BenchConfig, retriever, progress) -> dict:
    """Append-mode generation with an unmerged LoRA adapter (r=16 on bc.lora_targets) vs the same merged."""
    from peft import LoraConfig, get_peft_model

    length = min(bc.context_lengths[-1], 2048)
    context = context_tokens(lm, length, getattr(retriever, "index", None), bc.seed)
    cfg = GenerationConfig(
        mode="append",
        stride=bc.stride,
        k=bc.k,
        max_new_tokens=bc.new_tokens,
        markers=lm.marker_ids is not None and bc.markers,
        tail=bc.tail,
        stop_at_eos=False,
    )
    base = lm.model
    targets = lora_targets(base, bc.lora_targets)
    peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    peft_model.eval()
    try:
        unmerged = LoadedModel(peft_model, lm.tokenizer, lm.name, lm.device, lm.marker_ids)
        times = {"unmerged": [], "merged": []}
        _run(unmerged, context, retriever, cfg)
        for r in range(bc.repeats):
            progress(f"LoRA overhead: run {r + 1}/{bc.repeats}")
            times["unmerged"].append(_run(unmerged, context, retriever, cfg)["wall_s"])
        peft_model.merge_adapter()
        _run(unmerged, context, retriever, cfg)
        for _ in range(bc.repeats):
            times["merged"].append(_run(unmerged, context, retriever, cfg)["wall_s"])
        peft_model.unmerge_adapter()
    finally:
        lm.model = peft_model.unload()  # the plain base model again
    um, m = statistics.median(times["unmerged"]), statistics.median(times["merged"])
    return {"context_length": length, "targets": targets, "unmerged_s": um, "merged_s": m, "overhead": um / m - 1}


def format_table(result: dict) -> str:
    def spread(w: dict) -> str:
        return f"{w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f})"

    lines = [
        "| L | append s (min-max) | prepend s (min-max) | speedup | FLOP limit | "
        "speedup after 1st step | FLOP limit after 1st step |",
        "|" + "---|" * 7,
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['context_length']} | {spread(r['append']['wall_s'])} | {spread(r['prepend']['wall_s'])} | "
            f"{r['speedup']:.2f}x | {r['flop_limit_speedup']:.2f}x | {r['after_first_speedup']:.2f}x | "
            f"{r['after_first_flop_limit']:.2f}x |"
        )
    lines += [
        "",
        "| L | retrieval step append s | retrieval step prepend s | step speedup | step FLOP limit | "
        "append step / bare forward | append tokens/step |",
        "|" + "---|" * 7,
    ]
    for r in result["rows"]:
        a, p = r["append"], r["prepend"]
        lines.append(
            f"| {r['context_length']} | {a['retrieval_step_s']:.3f} | {p['retrieval_step_s']:.3f} | "
            f"{r['step_speedup']:.2f}x | {r['step_flop_limit']:.2f}x | {r['append_step_over_bare']:.2f} | "
            f"{r['append_step_tokens']:.0f} |"
        )
    lines += [
        "",
        "| L | mode | decode ms/token | bound ms (weights + KV) | / bound | weights-only bound ms | / weights bound "
        "| weights MB | KV MB | decode share of time |",
        "|" + "---|" * 10,
    ]
    for r in result["rows"]:
        for mode in ("append", "prepend"):
            x = r[mode]
            lines.append(
                f"| {r['context_length']} | {mode} | {x['decode_ms_per_token']:.1f} | {x['bound_ms']:.1f} | "
                f"{x['decode_over_bound']:.2f}x | {x['weights_bound_ms']:.1f} | "
                f"{x['decode_ms_per_token'] / x['weights_bound_ms']:.2f}x | {x['weight_mb']:.0f} | {x['kv_mb']:.0f} | "
                f"{100 * x['decode_share']:.0f}% |"
            )
    lines.append("")
    lines.append("| L | mode | retrieval s | prefill s | extend s | decode s | tokens/s |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        for mode in ("append", "prepend"):
            b = r[mode]["breakdown_s"]
            lines.append(
                f"| {r['context_length']} | {mode} | {b['retrieval_s']:.3f} | {b['prefill_s']:.2f} | "
                f"{b['extend_s']:.2f} | {b['decode_s']:.2f} | {r[mode]['tokens_per_s']:.1f} |"
            )
    if result.get("engine") == "upstream":
        lines.append("")
        lines.append(
            "| L | mode | prompt tokens computed by the engine | reused from its prefix cache | reused share |"
        )
        lines.append("|---|---|---|---|---|")
        for r in result["rows"]:
            for mode in ("append", "prepend"):
                x = r[mode]
                done, cached = x["engine_prompt_tokens"], x["engine_cached_tokens"]
                share = 100 * cached / max(1, done + cached)
                lines.append(f"| {r['context_length']} | {mode} | {done} | {cached} | {share:.0f}% |")
        if not result.get("engine_counts_cached", True):
            lines.append(
                "The engine did not say what came from its prefix cache, so every prompt token counts as computed "
                "(vLLM says it with --enable-prompt-tokens-details)."
            )
    if "lora" in result:
        lo = result["lora"]
        lines.append("")
        lines.append(
            f"LoRA (r=16, {'/'.join(t.split('_')[0] for t in lo.get('targets', ['q', 'v']))}) at "
            f"L={lo['context_length']}: unmerged {lo['unmerged_s']:.2f} s, "
            f"merged {lo['merged_s']:.2f} s, overhead {100 * lo['overhead']:.1f}%"
        )
    filled = (
        f" ({result['filled_passages']} for queries that matched nothing: random)"
        if "filled_passages" in result
        else ""
    )
    decode = "compiled" if result.get("compile") else "eager"
    if result.get("quantize"):
        decode += f", {result['quantize']} weights"
    lines.append(
        f"peak RSS {result['peak_rss_mb']:.0f} MB; passages: {result['passages']}{filled}; "
        f"{result['threads']} threads; {result.get('engine', 'torch')} engine, {result['device']} {result['dtype']}; "
        f"decode {decode}"
        + (f" (compiling took {result['compile_s']:.1f} s, not in the times above)" if result.get("compile") else "")
        + f"; memory copy {result.get('copy_bandwidth_gb_s', float('nan')):.1f} GB/s"
    )
    return "\n".join(lines)


def format_comparison(results: Sequence[dict]) -> str:
    """One row per engine and context length: the same export, contexts and passages timed in one run."""
    lines = [
        "| L | engine | append s | prepend s | speedup | FLOP limit | step speedup | decode ms/token (append) |",
        "|" + "---|" * 8,
    ]
    for result in results:
        for r in result["rows"]:
            a, p = r["append"], r["prepend"]
            lines.append(
                f"| {r['context_length']} | {result['engine']} | {a['wall_s']['median']:.2f} | "
                f"{p['wall_s']['median']:.2f} | {r['speedup']:.2f}x | {r['flop_limit_speedup']:.2f}x | "
                f"{r['step_speedup']:.2f}x | {a['decode_ms_per_token']:.1f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["context_length"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("prepend", "o-"), ("append", "s-")):
        med = [r[mode]["wall_s"]["median"] for r in result["rows"]]
        lo = [r[mode]["wall_s"]["median"] - r[mode]["wall_s"]["min"] for r in result["rows"]]
        hi = [r[mode]["wall_s"]["max"] - r[mode]["wall_s"]["median"] for r in result["rows"]]
        label = "prepend (In-Context RALM)" if mode == "prepend" else "append (FlashBack)"
        ax.errorbar(lengths, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    cfg = result["config"]
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"seconds for {cfg['new_tokens']} new tokens")
    ax.set_title(f"{result['model']} on {result['device']}, stride {cfg['stride']}, passage {cfg['passage_tokens']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
