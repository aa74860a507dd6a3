"""The `flashback` command: a table of subcommands, each a thin wrapper over the library.

Errors the user can fix (FlashbackError) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from flashback.data import DEFAULT_TAIL
from flashback.errors import FlashbackError
from flashback.model import DEFAULT_MODEL, cache_root

DEFAULT_INDEX = cache_root() / "indexes" / "default"  # api.DEFAULT_INDEX, without importing the API here


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face model directory or hub id (default: {DEFAULT_MODEL}, installed offline)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_decode_args(p: argparse.ArgumentParser, compile: bool = True) -> None:
    if compile:
        p.add_argument(
            "--compile",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="decode through a torch.compile'd step (about 2x faster per token on CPU once compiled; "
            "compiling takes 40-60 s per process, so off by default)",
        )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 weight-only quantization of the decode weights (with --compile; eval: every forward)",
    )


def _add_engine_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--engine",
        choices=["torch", "llamacpp"],
        default="torch",
        help=f"llamacpp: {what} a `flashback export --gguf` folder (--model DIR) in llama.cpp",
    )
    p.add_argument(
        "--flash-attn",
        action="store_true",
        help="--engine llamacpp: flash attention (faster prefill and extends; off by default, as measured)",
    )
    p.add_argument(
        "--upstream",
        metavar="URL",
        default=None,
        help="decode on an inference server at URL (llama-server, or vLLM's OpenAI API) that serves the export "
        "given as --model DIR; retrieval and layout stay here",
    )


def _load_engine(args: argparse.Namespace):
    """The upstream engine that --upstream asks for (None: --engine decides, loaded by the command)."""
    if args.flash_attn and args.engine != "llamacpp":
        raise FlashbackError("--flash-attn applies to --engine llamacpp only")
    if args.upstream:
        if args.engine != "torch":
            raise FlashbackError("choose one of --engine llamacpp and --upstream")
        from flashback.upstream import load_upstream

        return load_upstream(args.upstream, args.model)
    return None


def _decode_options(args: argparse.Namespace) -> dict:
    return {"compile": getattr(args, "compile", False), "quantize": args.quantize}


def _add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX})")
    p.add_argument(
        "--mode",
        default="append",
        choices=["append", "prepend", "none"],
        help="append = FlashBack, prepend = In-Context RALM, none = no retrieval",
    )
    p.add_argument("--stride", type=int, default=16, help="retrieve every N generated tokens (default 16)")
    p.add_argument("--query-tokens", type=int, default=32, help="query = the last N tokens (default 32)")
    p.add_argument("--k", type=int, default=1, help="passages per retrieval, concatenated (default 1)")
    p.add_argument(
        "--markers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap appended passages in <MARK_L>/<MARK_R> (default: on with an adapter)",
    )
    _add_tail_arg(p)
    _add_adapter_args(p)


def _add_adapter_args(p: argparse.ArgumentParser, repeatable: bool = False) -> None:
    p.add_argument(
        "--adapter",
        action="append" if repeatable else "store",
        default=None,
        help="LoRA adapter folder from `flashback train`; it serves the mode it was trained for "
        + ("(repeatable) " if repeatable else "")
        + "(default: the adapters shipped for the default model)",
    )
    p.add_argument("--no-adapter", action="store_true", help="do not use the shipped default adapters")


def _add_tail_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tail",
        type=int,
        default=None,
        help="append mode: put the passage this many context tokens before the end of the context "
        f"(default: the adapter's own, else {DEFAULT_TAIL})",
    )


def _tail(args: argparse.Namespace, adapter: str | None) -> int:
    """--tail, else the tail the adapter was trained with, else the package default."""
    from flashback.adapter import adapter_tail

    if args.tail is not None:
        if args.tail < 0:
            raise FlashbackError("--tail must be >= 0")
        return args.tail
    trained = adapter_tail(adapter)
    return DEFAULT_TAIL if trained is None else trained


def _adapters(args: argparse.Namespace) -> dict[str, str]:
    """Mode -> adapter folder for this command (model.plan_adapters decides)."""
    from flashback.model import plan_adapters

    given = args.adapter if isinstance(args.adapter, list) else [args.adapter] if args.adapter else []
    return plan_adapters(args.model, given, no_default=args.no_adapter)


def _adapter_for(args: argparse.Namespace, mode: str) -> str | None:
    """The adapter `mode` uses; an adapter given for another layout is an error, not silently applied."""
    plan = _adapters(args)
    if args.adapter and plan.get(mode) != args.adapter:
        trained = next(m for m, p in plan.items() if p == args.adapter)
        raise FlashbackError(f"adapter {args.adapter} was trained for {trained} mode; --mode {mode} does not use it")
    return plan.get(mode)


def _add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep only documents whose id matches (repeatable), e.g. 'python:library/*'",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="drop documents whose id matches (repeatable)"
    )


# ---- index / search ----------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    from flashback.api import build_index

    start = time.perf_counter()
    index = build_index(
        args.corpus,
        args.out,
        builtin=args.builtin,
        model=args.model,
        chunk_tokens=args.chunk_tokens,
        include=args.include,
        exclude=args.exclude,
        progress=not args.quiet,
    )
    m = index.manifest
    print(
        json.dumps(
            {
                "out": str(args.out),
                "documents": m["num_documents"],
                "passages": m["num_passages"],
                "tokens": m["num_tokens"],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )
    return 0


def _load_index(path: str | None):
    from flashback.api import load_index

    return load_index(path)


def cmd_search(args: argparse.Namespace) -> int:
    index = _load_index(args.index)
    hits = index.search([args.query], args.k)[0]
    if args.json:
        print(json.dumps([{**h.to_json(), "text": index.passage_text(h.index)} for h in hits], ensure_ascii=False))
        return 0
    for rank, h in enumerate(hits, 1):
        print(f"{rank}. [{h.score:.3f}] {h.id}  {h.title}")
        print("   " + index.passage_text(h.index)[:300].replace("\n", " ") + "\n")
    return 0


# ---- generate ----------------------------------------------------------------------------------
def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FlashbackError(f"cannot read prompt file {args.prompt_file}: {exc}") from None
    return args.prompt


def cmd_generate(args: argparse.Namespace) -> int:
    from flashback.generate import GenerationConfig, IndexRetriever, TextStreamer, generate, stream
    from flashback.model import encode, load_model, tokenizer_fingerprint

    prompt = _read_prompt(args)
    if not prompt.strip():
        raise FlashbackError("the prompt is empty")
    from flashback.export import read_export_card
    from flashback.llamacpp import export_card

    engine = _load_engine(args)
    card = export_card(args.model) if args.engine == "llamacpp" else read_export_card(args.model)
    if card:  # an export: its adapter is merged, its card says markers and tail
        if args.adapter:
            raise FlashbackError(f"{args.model} is an export (its adapter is merged in): drop --adapter")
        adapter, tuned = None, card.get("position") == args.mode
        markers = args.markers if args.markers is not None else tuned and bool(card.get("markers"))
        tail = args.tail if args.tail is not None else card.get("tail") if tuned else None
    else:
        adapter = _adapter_for(args, args.mode)
        markers = args.markers if args.markers is not None else bool(adapter) and args.mode == "append"
        tail = _tail(args, adapter if args.mode == "append" else None)
    cfg = GenerationConfig(
        mode=args.mode,
        stride=args.stride,
        query_tokens=args.query_tokens,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        markers=markers,
        tail=DEFAULT_TAIL if tail is None else tail,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    cfg.validate()
    index = _load_index(args.index) if cfg.mode != "none" else None
    if engine is not None:
        lm = engine
    elif args.engine == "llamacpp":
        from flashback.llamacpp import load_llamacpp

        lm = load_llamacpp(args.model, flash_attn=args.flash_attn)
    else:
        lm = load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            markers=markers and cfg.mode == "append",
            adapters={cfg.mode: adapter} if adapter else {},
            **_decode_options(args),
        )
    retriever = None
    if index is not None:
        index.check_tokenizer(tokenizer_fingerprint(lm.tokenizer))
        retriever = IndexRetriever(index)
    prompt_ids = encode(lm.tokenizer, prompt)
    if args.json:
        print(json.dumps(generate(lm, prompt_ids, retriever, cfg).to_json(), ensure_ascii=False))
        return 0
    streamer = TextStreamer(lm.tokenizer)
    for token in stream(lm, prompt_ids, retriever, cfg):
        sys.stdout.write(streamer.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- prepare / train -----------------------------------------------------------------------------
def _read_titles(path: str | None) -> frozenset[str]:
    if not path:
        return frozenset()
    try:
        return frozenset(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise FlashbackError(f"cannot read --forbid-titles file {path}: {exc}") from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from flashback.corpus import expand_paths, read_documents, select
    from flashback.data import PrepareConfig, prepare
    from flashback.model import load_tokenizer, tokenizer_fingerprint

    expand_paths(args.text)
    cfg = PrepareConfig(
        stride=args.stride,
        query_tokens=args.query_tokens,
        k=args.k,
        max_length=args.max_length,
        val_fraction=args.val_fraction,
        max_segments=args.max_segments,
        seed=args.seed,
    )
    if min(cfg.stride, cfg.query_tokens, cfg.k, cfg.max_length) < 1 or not 0 <= cfg.val_fraction < 1:
        raise FlashbackError("stride, query-tokens, k and max-length must be positive; val-fraction in [0, 1)")
    forbid = _read_titles(args.forbid_titles)
    index = _load_index(args.index)
    tokenizer = load_tokenizer(args.model)
    docs = select(
        read_documents(args.text), args.include, args.exclude, args.heldout, "train" if args.heldout else "all"
    )
    manifest = prepare(
        docs,
        tokenizer,
        args.model,
        tokenizer_fingerprint(tokenizer),
        index,
        args.index or str(DEFAULT_INDEX),
        args.out,
        cfg,
        forbid,
        progress=not args.quiet,
    )
    print(json.dumps({"out": str(args.out), **manifest["counts"], "documents": manifest["documents"]}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flashback.model import load_model
    from flashback.train import TrainConfig, train

    if args.tail and args.position != "append":
        raise FlashbackError("--tail only makes sense with --position append")
    cfg = TrainConfig(
        position=args.position,
        markers=args.markers,
        tail=(DEFAULT_TAIL if args.position == "append" else 0) if args.tail is None else args.tail,
        pack=args.pack,
        r=args.r,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=tuple(m for m in args.target_modules.split(",") if m),
        lr=args.lr,
        marker_lr=args.marker_lr,
        early_weight=args.early_weight,
        early_tokens=args.early_tokens,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        save_every=args.save_every,
        max_val_segments=args.max_val_segments,
        seed=args.seed,
        autocast=args.autocast,
    )
    cfg.validate()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, markers=cfg.markers)
    if args.throughput:
        from flashback.train import throughput

        print(json.dumps(throughput(lm, args.data, cfg, args.throughput)))
        return 0
    result = train(
        lm,
        args.data,
        args.out,
        cfg,
        resume=args.resume,
        log=lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True),
        progress=not args.quiet,
    )
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    summary["target_tokens_per_s"] = round(result.target_tokens_per_s, 2)
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


# ---- eval ----------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from flashback.corpus import expand_paths, read_documents, select
    from flashback.evaluate import EvalConfig, ModeSpec, evaluate, format_table
    from flashback.model import load_model, tokenizer_fingerprint

    expand_paths(args.text)
    specs = [ModeSpec.parse(m) for m in args.modes.split(",") if m.strip()]
    if not specs:
        raise FlashbackError("--modes is empty")
    if any(s.adapter for s in specs) and not args.adapter:
        raise FlashbackError("a +adapter mode needs --adapter DIR")
    from flashback.model import plan_adapters

    plan = plan_adapters(args.model, args.adapter or [], no_default=True)
    cfg = EvalConfig(
        stride=args.stride,
        query_tokens=args.query_tokens,
        k=args.k,
        max_length=args.max_length,
        limit_tokens=args.limit_tokens,
        ensemble=args.ensemble,
        fast=not args.slow,
        tail=_tail(args, plan.get("append")),
    )
    if min(cfg.stride, cfg.query_tokens, cfg.k, cfg.max_length) < 1:
        raise FlashbackError("stride, query-tokens, k and max-length must be at least 1")
    forbid = _read_titles(args.forbid_titles)
    index = _load_index(args.index)
    needs_markers = any(s.markers or s.adapter for s in specs)
    lm = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        markers=needs_markers,
        adapters=plan,
        **_decode_options(args),
    )
    index.check_tokenizer(tokenizer_fingerprint(lm.tokenizer))
    docs = select(
        read_documents(args.text), args.include, args.exclude, args.heldout, "heldout" if args.heldout else "all"
    )
    results = evaluate(
        lm, docs, index, specs, cfg, forbid, progress=lambda msg: print(f"[eval] {msg}", file=sys.stderr, flush=True)
    )
    print(format_table(results))
    if args.json:
        payload = {
            "config": cfg.__dict__,
            "index": str(args.index or DEFAULT_INDEX),
            "text": args.text,
            "include": args.include,
            "exclude": args.exclude,
            "heldout": args.heldout,
            "quantize": args.quantize,
            "results": [r.to_json() for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from flashback.bench import BenchConfig, format_comparison, format_table, plot, run_bench
    from flashback.export import read_export_card
    from flashback.model import load_model, tokenizer_fingerprint

    bc = BenchConfig(
        context_lengths=args.context_lengths,
        new_tokens=args.new_tokens,
        stride=args.stride,
        passage_tokens=args.passage_tokens,
        k=args.k,
        repeats=args.repeats,
        markers=args.markers,
        tail=_tail(args, None),
        lora_overhead=not args.no_lora,
    )
    for name in ("new_tokens", "stride", "passage_tokens", "k", "repeats"):
        if getattr(bc, name) < 1:
            raise FlashbackError(f"--{name.replace('_', '-')} must be at least 1")
    index = _load_index(args.index) if args.index else None
    lm = _load_engine(args)
    if lm is not None or args.engine == "llamacpp":  # an engine that runs an export: its card says markers and tail
        card = read_export_card(args.model) or {}  # (the engine's loader refuses a folder that is not an export)
        tail = args.tail if args.tail is not None else card.get("tail", bc.tail)
        bc = replace(bc, lora_overhead=False, markers=bool(card.get("markers")) and args.markers, tail=tail)
    if lm is None and args.engine == "llamacpp":
        from flashback.llamacpp import load_llamacpp

        step = bc.stride + bc.tail + bc.k * bc.passage_tokens + 2  # the bare forward of one step's tokens, too
        n_ctx = max(bc.context_lengths) + max(bc.new_tokens, step) + step
        lm = load_llamacpp(args.model, n_ctx=n_ctx, flash_attn=args.flash_attn)
    if lm is None:
        if args.beside_torch:
            raise FlashbackError("--beside-torch compares an engine (--engine llamacpp or --upstream) with PyTorch")
        lm = load_model(args.model, device=args.device, dtype=args.dtype, markers=args.markers, **_decode_options(args))
    if index is not None:
        index.check_tokenizer(tokenizer_fingerprint(lm.tokenizer))
    else:
        print("flashback: passages are random tokens (no --index given)", file=sys.stderr)
    progress = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = run_bench(lm, bc, index, progress=progress)
    print(format_table(result))
    if args.beside_torch:  # the same export, contexts and passages on the PyTorch engine, in this run
        progress("the same export on the PyTorch engine")
        torch_lm = load_model(
            args.model, device=args.device, dtype=args.dtype, markers=bc.markers, **_decode_options(args)
        )
        result["beside_torch"] = run_bench(torch_lm, bc, index, progress=progress)
        print("\nThe same export on the PyTorch engine:\n")
        print(format_table(result["beside_torch"]))
        print("\n" + format_comparison([result, result["beside_torch"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


# ---- serve ---------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from flashback.export import check_gguf_type, export
    from flashback.model import default_adapter

    check_gguf_type(args.gguf)  # before the progress line: an export that cannot finish does not start
    adapter = args.adapter or default_adapter(args.model, "append")
    if adapter is None:
        raise FlashbackError("--adapter DIR is needed: no adapter is shipped for this model")
    print(f"merging {adapter} into {args.model} ...", file=sys.stderr)
    card = export(adapter, args.out, model=args.model, dtype=args.dtype, gguf=args.gguf)
    print(json.dumps({"out": str(args.out), **card}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from flashback.server import ServerLimits, create_app
    except ImportError:
        raise FlashbackError("the server needs its extras: pip install 'flashback[server]'") from None
    from flashback.generate import IndexRetriever
    from flashback.model import load_model, tokenizer_fingerprint

    if not 0 <= args.port <= 65535:
        raise FlashbackError(f"--port {args.port} is not a TCP port (0-65535)")
    for name in ("max_prompt_tokens", "max_tokens", "max_active", "max_body_bytes", "max_request_work"):
        if getattr(args, name) < 1:
            raise FlashbackError(f"--{name.replace('_', '-')} must be at least 1")
    if args.shutdown_grace < 0:
        raise FlashbackError("--shutdown-grace must be >= 0")
    index = _load_index(args.index)
    lm = _load_engine(args)
    if lm is None and args.engine == "llamacpp":
        from flashback.llamacpp import load_llamacpp

        lm = load_llamacpp(args.model, flash_attn=args.flash_attn)
        if args.max_active != 1:  # one llama.cpp context holds one sequence: generations cannot interleave
            print("flashback: --engine llamacpp serves one generation at a time (--max-active 1)", file=sys.stderr)
            args.max_active = 1
    slots = getattr(getattr(lm, "client", None), "slots", None)
    if slots and args.max_active > slots:  # a generation beyond them would evict another's prompt from its slot
        print(f"flashback: the upstream llama-server has {slots} slot(s): --max-active {slots}", file=sys.stderr)
        args.max_active = slots
    if lm is not None:  # an engine that runs an export: its card says markers and tail
        from flashback.export import read_export_card

        card = read_export_card(args.model)
        plan = {}
        markers = args.markers if args.markers is not None else bool(card.get("markers"))
        tail = _tail(args, None) if args.tail is not None else card.get("tail", DEFAULT_TAIL)
    else:
        plan = _adapters(args)
        markers = args.markers if args.markers is not None else "append" in plan
        lm = load_model(
            args.model, device=args.device, dtype=args.dtype, markers=markers, adapters=plan, **_decode_options(args)
        )
        tail = _tail(args, plan.get("append"))
    index.check_tokenizer(tokenizer_fingerprint(lm.tokenizer))
    limits = ServerLimits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_active=args.max_active,
        max_body_bytes=args.max_body_bytes,
        max_request_work=args.max_request_work,
        shutdown_grace_s=args.shutdown_grace,
    )
    app = create_app(lm, IndexRetriever(index), limits, markers=markers, tail=tail, docs=args.docs)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=limits.shutdown_grace_s
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashback",
        description="FlashBack: retrieval-augmented generation that appends retrieved passages after "
        "the context and reuses the KV cache, instead of prepending and recomputing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="split a corpus into passages and build a BM25 index")
    p.add_argument("corpus", nargs="*", help=".txt/.md/.rst files, folders, .jsonl(.gz) with id/title/text")
    p.add_argument(
        "--builtin",
        choices=["python-docs"],
        default=None,
        help="also index a corpus every Python has: python-docs = the reference topics of help() and the "
        "standard-library module docs (offline, ~4.7M characters)",
    )
    p.add_argument("--out", required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer cuts the passages")
    p.add_argument("--chunk-tokens", type=int, default=128, help="passage length in model tokens (default 128)")
    _add_filter_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="show the top BM25 passages for a query")
    p.add_argument("index", help="index folder")
    p.add_argument("query")
    p.add_argument("-k", "--k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print a JSON list of hits")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("generate", help="generate with retrieval (append / prepend / none)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from a file")
    _add_model_args(p)
    _add_decode_args(p)
    _add_engine_arg(p, "run")
    _add_retrieval_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: text, retrievals, forward passes, timings"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare", help="turn running text into (context, passages, target) training examples")
    p.add_argument("text", nargs="+", help="same formats as `index`")
    p.add_argument("--index", required=True, help="index to retrieve passages from")
    p.add_argument("--out", required=True, help="data folder to write (train.jsonl, val.jsonl, manifest.json)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer is used")
    p.add_argument("--stride", type=int, default=16, help="target tokens per example (default 16)")
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512, help="context + markers + passages + target")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents set aside for validation")
    p.add_argument(
        "--heldout",
        type=float,
        default=0.0,
        help="leave out this hashed fraction of documents for evaluation (use the same in `eval`)",
    )
    p.add_argument(
        "--max-segments", type=int, default=None, help="keep a seeded sample of this many segments (text windows)"
    )
    p.add_argument("--forbid-titles", default=None, help="file of titles never to retrieve, one a line")
    p.add_argument("--seed", type=int, default=0)
    _add_filter_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter + marker embeddings (base model frozen)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder written by `flashback prepare`")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--position", default="append", choices=["append", "prepend"])
    p.add_argument("--markers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--tail",
        type=int,
        default=None,
        help=f"append: context tokens placed after the passage (default {DEFAULT_TAIL}; 0 = the paper's layout)",
    )
    p.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append: train all targets of a segment in one forward over a shared prefix (default on)",
    )
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated linear layer names, or all-linear (every one but the output head; the default)",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--marker-lr", type=float, default=None, help="learning rate of the marker rows (default: --lr)")
    p.add_argument(
        "--early-weight", type=float, default=1.0, help="loss weight of the first --early-tokens target tokens"
    )
    p.add_argument("--early-tokens", type=int, default=2)
    p.add_argument(
        "--batch-size", type=int, default=1, help="segments per step when packing, else examples (default 1)"
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--max-val-segments", type=int, default=8, help="validation segments, spread over the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--autocast",
        default="auto",
        choices=["auto", "bfloat16", "none"],
        help="bf16 matmuls over fp32 weights; auto = where the hardware runs bf16 natively (default)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument(
        "--throughput",
        type=int,
        default=0,
        metavar="N",
        help="measure target tokens/s packed vs per example on N segments (JSON) instead of training",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity of retrieval modes on the same target tokens")
    p.add_argument("text", nargs="+", help="same formats as `index`")
    _add_model_args(p)
    _add_decode_args(p, compile=False)
    p.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX})")
    p.add_argument(
        "--modes",
        default="none,prepend,append",
        help="comma-separated: none, prepend, append, append+markers, and +adapter on any of them",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="adapter for the +adapter modes of the layout it was trained for (repeatable: append and prepend)",
    )
    _add_tail_arg(p)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--ensemble", action="store_true", help="mix per-passage probabilities instead of concatenating")
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--limit-tokens", type=int, default=None, help="score about this many tokens, spread evenly")
    p.add_argument(
        "--heldout",
        type=float,
        default=0.0,
        help="evaluate only the hashed held-out fraction of documents (the one `prepare` left out)",
    )
    p.add_argument("--forbid-titles", default=None, help="file of titles never to retrieve, one a line")
    p.add_argument("--slow", action="store_true", help="score every example from scratch (no shared cache)")
    p.add_argument("--json", help="write the results to this JSON file")
    _add_filter_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="time append vs prepend generation across context lengths")
    _add_model_args(p)
    _add_decode_args(p)
    _add_engine_arg(p, "time")
    p.add_argument("--index", default=None, help="retrieve real passages from this index (default: random tokens)")
    p.add_argument("--context-lengths", type=_int_list, default=(512, 1024, 2048, 4096))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--passage-tokens", type=int, default=128, help="random-passage length (without --index)")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markers", action=argparse.BooleanOptionalAction, default=True)
    _add_tail_arg(p)
    p.add_argument("--no-lora", action="store_true", help="skip the unmerged-vs-merged LoRA measurement")
    p.add_argument(
        "--beside-torch",
        action="store_true",
        help="with --engine llamacpp or --upstream: then time the same export on the PyTorch engine, in this run",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--plot", help="draw time vs context length to this PNG")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="a plain model folder with the adapter and markers merged, for engines")
    _add_model_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder (default: the one shipped for the default model)")
    p.add_argument("--out", required=True, help="folder to write (replaced only if it is an earlier export)")
    p.add_argument(
        "--gguf",
        choices=["f16", "q8_0", "q4_1"],
        default=None,
        help="also write model-TYPE.gguf for llama.cpp (its converter; q4_1 then its quantizer: llama-cpp-python)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP completions with FlashBack retrieval")
    _add_model_args(p)
    _add_decode_args(p)
    _add_engine_arg(p, "serve")
    p.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX})")
    _add_adapter_args(p, repeatable=True)
    p.add_argument(
        "--markers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append-mode marking tokens (default: on with an adapter)",
    )
    _add_tail_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-active", type=int, default=8, help="generations in flight; more requests wait")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument(
        "--max-request-work",
        type=int,
        default=262_144,
        help="token positions one request may compute, retrieval recomputation included (default 262144)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds open streams get after SIGTERM before they are cut (default 5)",
    )
    p.add_argument("--docs", action="store_true", help="serve the OpenAPI page at /docs (off by default)")
    p.set_defaults(func=cmd_serve)

    return parser


class Terminated(Exception):
    pass


def _terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("flashback: %(levelname)s: %(message)s"))
    log = logging.getLogger("flashback")
    log.handlers[:] = [handler]
    log.propagate = False
    logging.getLogger("bm25s").setLevel(logging.ERROR)
    # transformers warns about its own deprecations when peft calls it; not actionable for users
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    args = build_parser().parse_args(argv)
    # SIGTERM raises like Ctrl-C does, so `finally` blocks run: temporary output folders are removed.
    # (uvicorn installs its own handlers while `serve` runs.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except FlashbackError as exc:
        print(f"flashback: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashback: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("flashback: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
