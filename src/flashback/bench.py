"""Runtime of append (FlashBack) vs prepend (In-Context RALM) generation across context lengths.

For each context length both modes generate the same number of tokens with the same retrieval
schedule; runs are interleaved (the order alternates each repeat) after a warm-up, and medians are
reported. Beside each measured speedup stand two limits computed from the forward passes the two runs
actually made: the FLOP model alone, and a roofline that charges prefills and extends their FLOPs at the
machine's measured matmul peak and decode steps their bytes (weights + the keys and values they read) at its
measured copy bandwidth, so that a ratio's ceiling means the same thing on a compute-bound GPU and a
bandwidth-bound CPU. `--long` runs the contexts FlashBack is for (8k to 32k tokens, as the model allows).
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flashback.config import BenchConfig, GenerationConfig
from flashback.engines.base import Architecture, Engine
from flashback.errors import FlashbackError
from flashback.generate import decode_steps, generate
from flashback.layout import reserved_positions
from flashback.text.retrieval import Hit, Index, IndexRetriever, Retrieved

# The runtime test of the FlashBack paper (its test_speed.py): random token ids, an initial context of 512 tokens grown
# to 2,048, a random 128-token document every 16 generated tokens, no marking tokens; its append mode cuts the cache
# back before the old document and the last 16 tokens and re-feeds those after the new one, which is tail = stride.
PAPER_REGIME = {
    "context_lengths": (512,),
    "total_length": 2048,
    "passage_tokens": 128,
    "stride": 16,
    "markers": False,
    "tail": 16,
    "lora_overhead": False,
}


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
            got.append(self.search.passage(int(self.rng.choice(self.full))))
            self.filled += 1
        return got


# --long: the contexts FlashBack is for; a model whose positions end before one gets the largest thousand that fits
LONG_CONTEXTS = (8192, 16384, 32768)
LONG_NEW_TOKENS = 32  # two retrieval steps at stride 16: the first (with the shared prefill) and one more
WARM_UP_CONTEXT = 512  # --long warms up once at this length: a warm-up at 32k would cost minutes for nothing


def long_contexts(max_positions: int, reserve: int) -> tuple[int, ...]:
    """--long's context lengths for a model of `max_positions` when a run needs `reserve` more positions."""
    room = max_positions - reserve
    lengths = [n for n in LONG_CONTEXTS if n <= room]
    largest = room // 1000 * 1000
    if largest >= 8000 and largest > (lengths[-1] if lengths else 0) and len(lengths) < len(LONG_CONTEXTS):
        lengths.append(largest)
    if not lengths:
        raise FlashbackError(f"the model's {max_positions} positions hold no long context (--long needs 8,000)")
    return tuple(lengths)


def flops(arch: Architecture, n: int, cached: int) -> float:
    """FLOP model of one forward of n new tokens over `cached` tokens (logits for the last one only).

    2·P·n for the weights (P without the embedding lookup) + 4·attention width·(keys each query sees) for
    attention: n·c + n²/2 in a full-attention layer, at most the window per query in a sliding one.
    """
    seen_full = n * cached + n * n / 2
    seen_sliding = min(seen_full, n * arch.window) if arch.sliding_layers else 0.0
    full = arch.layers - arch.sliding_layers
    attention = 4 * (arch.attention_width or arch.width) * (full * seen_full + arch.sliding_layers * seen_sliding)
    return 2 * arch.body_params * n + 2 * arch.embedding_params + attention


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a large fp32 matrix product (median of `repeats`): what a compute-bound forward can reach."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return 2 * size**3 / _median_seconds(lambda: torch.mm(a, b), device, repeats)


def _median_seconds(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `work` over `repeats` calls, after two untimed ones."""
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        t0 = time.perf_counter()
        work()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Roofline:
    """Seconds a forward needs at best on this machine: its FLOPs at the matmul peak if it runs several tokens,
    its bytes (weights + keys and values read) at the copy bandwidth if it decodes one."""

    def __init__(self, engine: Engine, mode: str, peak: float, bandwidth: float):
        self.arch = engine.arch
        self.weights, self.per_token = decode_bytes(engine, mode)
        self.peak, self.bandwidth = peak, bandwidth

    def seconds(self, forwards) -> float:
        total = 0.0
        for f in forwards:
            cached = f.cache_len - f.tokens
            if f.kind == "decode":
                total += (self.weights + self.per_token * self.arch.kv_read(cached)) / self.bandwidth
            else:
                total += flops(self.arch, f.tokens, cached) / self.peak
        return total


class PeakRss:
    """The process's largest resident set while a block runs (sampled every 20 ms), in MB."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trace_flops(arch: Architecture, forwards) -> float:
    return sum(flops(arch, f.tokens, f.cache_len - f.tokens) for f in forwards)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 10) -> float:
    """Bytes per second of a tensor copy far larger than any cache (read + write counted), median of `repeats`
    (the best of many copies of 256 MB once read 64 GB/s where the median was 36)."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _median_seconds(lambda: dst.copy_(src), device, repeats)


def decode_bytes(engine: Engine, mode: str) -> tuple[int, int]:
    """(weight bytes, KV bytes per cached token) one decode step reads, on the engine."""
    arch = engine.arch
    return engine.decode_weight_bytes(mode), 2 * arch.layers * arch.kv_width * engine.kv_value_bytes


def context_tokens(engine: Engine, length: int, index: Index | None, seed: int) -> list[int]:
    """Real text (consecutive index passages) when an index is given, else random tokens."""
    if index is not None:
        ids = index.token_ids[:length].tolist()
        if len(ids) < length:
            raise FlashbackError(f"the index holds fewer than {length} tokens for a context")
        return ids
    rng = np.random.default_rng(seed)
    return rng.integers(0, len(engine.tokenizer) - 2, length).tolist()


def _run(engine: Engine, context, retriever, cfg: GenerationConfig, roofline: Roofline | None = None) -> dict:
    engine.forget()  # a new context for an engine with a prefix cache, as for the others: nothing cached
    synchronize(engine.device)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        result = generate(engine, context, retriever, cfg)
        synchronize(engine.device)
        wall = time.perf_counter() - t0
    trace = result.trace
    if len(result.token_ids) != cfg.max_new_tokens or trace.dropped_prompt_tokens:
        raise FlashbackError("benchmark run was cut short (context too long for the model?)")
    if any(r.get("skipped") for r in trace.retrievals):
        raise FlashbackError("a benchmark retrieval step went without passages: its timing would not be a step")
    multi = [f for f in trace.forwards if f.kind != "decode"]
    decodes = [f for f in trace.forwards if f.kind == "decode"]
    # KV tokens a decode step reads per layer: the filled cache (eager), or the whole fixed buffer, masked (Decoder);
    # a sliding-window layer needs only its window
    arch = engine.arch
    kv_read = arch.kv_read(trace.cache_capacity or statistics.mean(f.cache_len - 1 for f in decodes))
    # Forwards before the first token: the first stretch's (the context's prefill, and in append mode the first
    # passage, which an upstream engine computes in the same request).
    first_stretch = trace.forwards[: trace.stretch_starts[1]] if len(trace.stretch_starts) > 1 else trace.forwards
    first = [f for f in first_stretch if f.kind != "decode"]
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
        "flops": trace_flops(arch, trace.forwards),
        "after_first_s": wall - first_s,
        "after_first_flops": trace_flops(arch, trace.forwards) - trace_flops(arch, first),
        "compile_choice": trace.compile,
        "compiled": bool(trace.cache_capacity),  # decoded through the fixed-buffer decode step
        "peak_rss_mb": rss.peak,
        "roofline_s": roofline.seconds(trace.forwards) if roofline else None,
        "after_first_roofline_s": roofline.seconds(trace.forwards) - roofline.seconds(first) if roofline else None,
    }


def bare_extend_seconds(engine: Engine, context: list[int], n: int, repeats: int) -> float:
    """Median time of one forward of n tokens against the context's cache, then rolled back."""
    cache = engine.session()
    cache.extend(context)
    times = []
    for r in range(repeats):
        ids = context[r : r + n]  # new tokens each time: an engine with a prefix cache must not find them cached
        t0 = time.perf_counter()
        cache.extend(ids)
        synchronize(engine.device)
        times.append(time.perf_counter() - t0)
        cache.rollback(len(context))
    return statistics.median(times)


def decode_bound(engine: Engine, mode: str, kv_tokens: float, bandwidth: float) -> dict:
    """Bandwidth bound of one decode step: the bytes it must read over the measured copy bandwidth."""
    weights, per_token = decode_bytes(engine, mode)
    return {
        "weight_mb": weights / 1e6,
        "kv_mb": per_token * kv_tokens / 1e6,
        "weights_bound_ms": 1000 * weights / bandwidth,
        "bound_ms": 1000 * (weights + per_token * kv_tokens) / bandwidth,
    }


def _summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(
    engine: Engine, bc: BenchConfig, index: Index | None = None, progress: Callable[[str], None] = lambda s: None
) -> dict:
    bc.validate()
    retriever = (
        FullRetriever(index, bc.seed)
        if index is not None
        else RandomRetriever(len(engine.tokenizer) - 2, bc.passage_tokens, bc.seed)
    )
    for length in bc.context_lengths:
        if new_tokens(bc, length) <= bc.stride:
            raise FlashbackError(
                f"--new-tokens ({new_tokens(bc, length)} at L={length}) must exceed --stride ({bc.stride}): the bench "
                "times the retrieval steps after the first"
            )
    progress("measuring memory-copy bandwidth and the matmul peak")
    bandwidth = copy_bandwidth(engine.device)
    peak = matmul_peak(engine.device)
    machine = {"bandwidth": bandwidth, "peak": peak, "warmed": False}
    rows = [_bench_length(engine, bc, index, retriever, length, machine, progress) for length in bc.context_lengths]
    info = engine.describe()
    out = {
        "model": engine.name,
        "device": info["device"],
        "engine": info["engine"],
        "dtype": info["dtype"],
        "threads": torch.get_num_threads(),
        "passages": "index" if index is not None else "random tokens",
        "compile": info["compile"],
        "quantize": info["quantize"],
        "compile_s": info["compile_s"],
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "matmul_peak_gflop_s": peak / 1e9,
        "config": bc.__dict__,
        "rows": rows,
    }
    if engine.capabilities.remote:  # whether the engine's counts of cached prompt tokens can be read
        out["engine_counts_cached"] = engine.capabilities.counts_cached_tokens
    if bc.lora_overhead and engine.capabilities.adapters:  # only an engine running unmerged adapters has the cost
        out["lora"] = lora_overhead(engine, bc, retriever, progress)
    if isinstance(retriever, FullRetriever):  # queries that matched nothing, filled with random index passages
        out["filled_passages"] = retriever.filled
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine.device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(engine.device) / 2**20
    return out


def new_tokens(bc: BenchConfig, length: int) -> int:
    """Tokens generated after a context of `length`: --new-tokens, or up to --total-length (the paper's test)."""
    return bc.total_length - length if bc.total_length else bc.new_tokens


def _bench_configs(engine: Engine, bc: BenchConfig, new: int) -> dict[str, GenerationConfig]:
    markers = bc.markers and engine.marker_ids is not None
    return {
        m: GenerationConfig(
            mode=m,
            stride=bc.stride,
            query_tokens=bc.query_tokens,
            k=bc.k,
            max_new_tokens=new,
            markers=markers,
            tail=bc.tail,
            stop_at_eos=False,
        )
        for m in ("append", "prepend")
    }


def _bench_length(engine: Engine, bc: BenchConfig, index, retriever, length: int, machine: dict, progress) -> dict:
    """Both modes at one context length: a warm-up, then interleaved runs; medians, the FLOP and roofline limits."""
    passage, new = retriever.max_passage_tokens, new_tokens(bc, length)
    if length + new + bc.k * passage + 2 > engine.max_positions:
        raise FlashbackError(f"context length {length} does not fit the model's {engine.max_positions} positions")
    bandwidth = machine["bandwidth"]
    context = context_tokens(engine, length, index, bc.seed)
    cfgs = _bench_configs(engine, bc, new)
    rooflines = {mode: Roofline(engine, mode, machine["peak"], bandwidth) for mode in cfgs}
    warm_up = {}
    if not (bc.long and machine["warmed"]):
        warm_context = context[:WARM_UP_CONTEXT] if bc.long else context  # long: once, short, for the first calls
        progress(f"L={length}: warm-up" + (f" (at {len(warm_context)} tokens, once)" if bc.long else ""))
        runs_left = len(cfgs) * (bc.repeats + 1)
        try:
            for mode in cfgs:
                runs_left -= 1
                # the timed runs decode on the warm-up's graphs: --compile auto weighs their tokens too
                engine.later_decode_tokens = runs_left * decode_steps(cfgs[mode], new)
                warm_up[mode] = _run(engine, warm_context, retriever, cfgs[mode])
        finally:
            engine.later_decode_tokens = 0
        machine["warmed"] = True
    if bc.long:
        _compile_decode_steps(engine, cfgs, len(context), passage, new, progress)
    runs: dict[str, list[dict]] = {"append": [], "prepend": []}
    for r in range(bc.repeats):
        for mode in ("append", "prepend") if r % 2 == 0 else ("prepend", "append"):
            progress(f"L={length}: {mode} run {r + 1}/{bc.repeats}")
            runs[mode].append(_run(engine, context, retriever, cfgs[mode], rooflines[mode]))
    markers = cfgs["append"].markers
    step_tokens = bc.stride + bc.tail + bc.k * passage + 2 * markers  # what an append retrieval step encodes
    row = {"context_length": length, "new_tokens": new}
    for mode, rs in runs.items():
        row[mode] = _mode_summary(engine, new, mode, rs, bandwidth)
        row[mode]["warm_up_compile_choice"] = warm_up[mode]["compile_choice"] if warm_up else None
    a, p = row["append"], row["prepend"]
    arch = engine.arch
    row["speedup"] = p["wall_s"]["median"] / a["wall_s"]["median"]
    row["flop_limit_speedup"] = p["flops"] / a["flops"]
    row["after_first_speedup"] = p["after_first_s"] / a["after_first_s"]
    row["after_first_flop_limit"] = p["after_first_flops"] / a["after_first_flops"]
    row["step_speedup"] = p["retrieval_step_s"] / a["retrieval_step_s"]
    row["step_flop_limit"] = flops(arch, length + bc.k * passage, 0) / flops(arch, step_tokens, length)
    row["roofline_limit"] = p["roofline_s"] / a["roofline_s"]
    row["after_first_roofline_limit"] = p["after_first_roofline_s"] / a["after_first_roofline_s"]
    row["after_first_of_roofline"] = row["after_first_speedup"] / row["after_first_roofline_limit"]
    row["append_step_tokens"] = statistics.median(
        r["computed_tokens"] for r in runs["append"][0]["retrieval_records"][1:]
    )
    for mode in ("append", "prepend"):
        row[mode]["decode_over_bound"] = row[mode]["decode_ms_per_token"] / row[mode]["bound_ms"]
    # the bare forward needs the context prefilled once more: minutes at 32k, so --long leaves it out
    row["bare_extend_s"] = None if bc.long else bare_extend_seconds(engine, context, step_tokens, max(3, bc.repeats))
    row["append_step_over_bare"] = a["retrieval_step_s"] / row["bare_extend_s"] if row["bare_extend_s"] else None
    progress(f"L={length}: speedup {row['speedup']:.2f}x (FLOP limit {row['flop_limit_speedup']:.2f}x)")
    return row


def _compile_decode_steps(
    engine: Engine, cfgs: dict[str, GenerationConfig], length: int, passage: int, new: int, progress
) -> None:
    """--long with --compile on: the decode step's graph for each mode's cache size compiles here, not in a timed
    run (the short warm-up's cache is smaller, and a warm-up at the length itself would cost a long prefill)."""
    if getattr(engine, "compile", "off") != "on":
        return
    for mode, cfg in cfgs.items():
        positions = len(engine.head_ids) + length + reserved_positions(cfg, passage) + new
        progress(f"L={length}: compiling the {mode} decode step for {positions} positions")
        thread = engine.warm_up(mode, [positions])
        if thread is not None:
            thread.join()


def _mode_summary(engine: Engine, new: int, mode: str, rs: list[dict], bandwidth: float) -> dict:
    wall = _summary([x["wall_s"] for x in rs])
    out = {
        "wall_s": wall,
        "tokens_per_s": new / wall["median"],
        "breakdown_s": {
            k: statistics.median(x[k] for x in rs) for k in ("retrieval_s", "prefill_s", "extend_s", "decode_s")
        },
        "retrieval_step_s": statistics.median(s + x["retrieval_each_s"] for x in rs for s in x["step_s"]),
        "decode_ms_per_token": 1000 * statistics.median(x["decode_s"] for x in rs) / (new - rs[0]["retrievals"]),
        "decode_share": statistics.median(x["decode_s"] / x["wall_s"] for x in rs),
        **decode_bound(engine, mode, rs[0]["kv_tokens_read"], bandwidth),
        "flops": rs[0]["flops"],
        "after_first_s": statistics.median(x["after_first_s"] for x in rs),
        "after_first_flops": rs[0]["after_first_flops"],
        "decode": _decode_kind(engine, rs),
        "compile_choice": rs[0]["compile_choice"],
        "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
        "roofline_s": statistics.median(x["roofline_s"] for x in rs),
        "after_first_roofline_s": statistics.median(x["after_first_roofline_s"] for x in rs),
    }
    if engine.capabilities.remote:
        out["engine_prompt_tokens"] = rs[0]["engine_prompt_tokens"]
        out["engine_cached_tokens"] = rs[0]["engine_cached_tokens"]
    return out


def _decode_kind(engine: Engine, rs: list[dict]) -> str:
    """How the timed runs decoded: "compiled", "eager", "int8", or "mixed" when runs differed."""
    info = engine.describe()
    if info["compile"] is None:  # an engine that decodes its own way
        return engine.kind
    kinds = {"compiled" if r["compiled"] and info["compile"] != "off" else "eager" for r in rs}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return f"{kind}, int8 weights" if info["quantize"] else kind


def lora_overhead(engine: Engine, bc: BenchConfig, retriever, progress) -> dict:
    """Append-mode generation with an unmerged LoRA adapter (r=16 on bc.lora_targets) vs the same merged."""
    length = min(bc.context_lengths[-1], 2048)
    context = context_tokens(engine, length, getattr(retriever, "index", None), bc.seed)
    cfg = _bench_configs(engine, bc, bc.new_tokens)["append"]
    from flashback.config import TrainConfig, defaults
    from flashback.engines.torch.adapters import fresh_lora

    shape = defaults(TrainConfig)  # an untrained adapter of the shipped recipe's shape
    with fresh_lora(engine, bc.lora_targets, shape["r"], shape["alpha"]) as (unmerged, peft_model, targets):
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
    um, m = statistics.median(times["unmerged"]), statistics.median(times["merged"])
    return {"context_length": length, "targets": targets, "unmerged_s": um, "merged_s": m, "overhead": um / m - 1}


def _table(header: str, rows: list[str]) -> list[str]:
    return [header, "|" + "---|" * (header.count("|") - 1), *rows]


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(w: dict) -> str:
    return f"{w['median']:.2f} ({w['min']:.2f}-{w['max']:.2f})"


def _speed_tables(rows: list[dict]) -> list[str]:
    """Whole runs, then the retrieval steps after the first."""
    whole = _table(
        "| L | append s (min-max) | prepend s (min-max) | speedup | FLOP limit | "
        "speedup after 1st step | FLOP limit after 1st step |",
        [
            f"| {r['context_length']} | {_spread(r['append']['wall_s'])} | {_spread(r['prepend']['wall_s'])} | "
            f"{r['speedup']:.2f}x | {r['flop_limit_speedup']:.2f}x | {r['after_first_speedup']:.2f}x | "
            f"{r['after_first_flop_limit']:.2f}x |"
            for r in rows
        ],
    )
    steps = _table(
        "| L | retrieval step append s | retrieval step prepend s | step speedup | step FLOP limit | "
        "append step / bare forward | append tokens/step |",
        [
            f"| {r['context_length']} | {r['append']['retrieval_step_s']:.3f} | {r['prepend']['retrieval_step_s']:.3f} "
            f"| {r['step_speedup']:.2f}x | {r['step_flop_limit']:.2f}x | {_maybe(r['append_step_over_bare'])} | "
            f"{r['append_step_tokens']:.0f} |"
            for r in rows
        ],
    )
    return [*whole, "", *steps]


def _roofline_table(rows: list[dict]) -> list[str]:
    """Each speedup beside its roofline limit, and what each mode held in memory at most."""
    return _table(
        "| L | step speedup | step limit | end to end | roofline limit | after the 1st step | roofline limit "
        "| of the limit | peak RSS MB append / prepend |",
        [
            f"| {r['context_length']} | {r['step_speedup']:.1f}x | {r['step_flop_limit']:.1f}x | {r['speedup']:.2f}x | "
            f"{r['roofline_limit']:.2f}x | {r['after_first_speedup']:.2f}x | {r['after_first_roofline_limit']:.2f}x | "
            f"{100 * r['after_first_of_roofline']:.0f}% | {r['append']['peak_rss_mb']:.0f} / "
            f"{r['prepend']['peak_rss_mb']:.0f} |"
            for r in rows
        ],
    )


def _time_tables(rows: list[dict]) -> list[str]:
    """The decode step against its bandwidth bound, then where each run's time went."""
    per_mode = [(r["context_length"], mode, r[mode]) for r in rows for mode in ("append", "prepend")]
    decode = _table(
        "| L | mode | decode ms/token | bound ms (weights + KV) | / bound | weights-only bound ms | / weights bound "
        "| weights MB | KV MB | decode share of time |",
        [
            f"| {length} | {mode} | {x['decode_ms_per_token']:.1f} | {x['bound_ms']:.1f} | "
            f"{x['decode_over_bound']:.2f}x | {x['weights_bound_ms']:.1f} | "
            f"{x['decode_ms_per_token'] / x['weights_bound_ms']:.2f}x | {x['weight_mb']:.0f} | {x['kv_mb']:.0f} | "
            f"{100 * x['decode_share']:.0f}% |"
            for length, mode, x in per_mode
        ],
    )
    breakdown = _table(
        "| L | mode | retrieval s | prefill s | extend s | decode s | tokens/s |",
        [
            f"| {length} | {mode} | {x['breakdown_s']['retrieval_s']:.3f} | {x['breakdown_s']['prefill_s']:.2f} | "
            f"{x['breakdown_s']['extend_s']:.2f} | {x['breakdown_s']['decode_s']:.2f} | {x['tokens_per_s']:.1f} |"
            for length, mode, x in per_mode
        ],
    )
    return [*decode, "", *breakdown]


def _prefix_cache_table(result: dict) -> list[str]:
    """What an engine with a prefix cache computed and what it reused, by its own count."""
    rows = []
    for r in result["rows"]:
        for mode in ("append", "prepend"):
            done, cached = r[mode]["engine_prompt_tokens"], r[mode]["engine_cached_tokens"]
            rows.append(
                f"| {r['context_length']} | {mode} | {done} | {cached} | {100 * cached / max(1, done + cached):.0f}% |"
            )
    lines = _table(
        "| L | mode | prompt tokens computed by the engine | reused from its prefix cache | reused share |", rows
    )
    if not result.get("engine_counts_cached", True):
        lines.append(
            "The engine did not say what came from its prefix cache, so every prompt token counts as computed "
            "(vLLM says it with --enable-prompt-tokens-details)."
        )
    return ["", *lines]


def _summary_line(result: dict) -> str:
    filled = (
        f" ({result['filled_passages']} for queries that matched nothing: random)"
        if "filled_passages" in result
        else ""
    )
    kinds = {r[m].get("decode", "eager") for r in result["rows"] for m in ("append", "prepend")}
    decode = " / ".join(sorted(kinds))
    return (
        f"peak RSS {result['peak_rss_mb']:.0f} MB; passages: {result['passages']}{filled}; "
        f"{result['threads']} threads; {result.get('engine', 'torch')} engine, {result['device']} {result['dtype']}; "
        + (f"--compile {result['compile']}: " if result.get("compile") else "")
        + f"decode {decode}"
        + (f" (compiling took {result['compile_s']:.1f} s, in the warm-up)" if result.get("compile_s") else "")
        + f"; memory copy {result.get('copy_bandwidth_gb_s', float('nan')):.1f} GB/s"
        + f"; matmul peak {result.get('matmul_peak_gflop_s', float('nan')):.0f} GFLOP/s"
    )


def format_table(result: dict) -> str:
    lines = [*_speed_tables(result["rows"]), "", *_roofline_table(result["rows"]), "", *_time_tables(result["rows"])]
    if "engine_counts_cached" in result:
        lines += _prefix_cache_table(result)
    if "lora" in result:
        lo = result["lora"]
        lines.append("")
        lines.append(
            f"LoRA (r=16, {'/'.join(t.split('_')[0] for t in lo.get('targets', ['q', 'v']))}) at "
            f"L={lo['context_length']}: unmerged {lo['unmerged_s']:.2f} s, "
            f"merged {lo['merged_s']:.2f} s, overhead {100 * lo['overhead']:.1f}%"
        )
    lines.append(_summary_line(result))
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
