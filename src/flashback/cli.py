"""The `flashback` command: a table of subcommands, each a thin wrapper over the library.

Flags, their types, defaults and help come from the config dataclasses (config.py); a flag the user does not
give keeps the config's default, and the commands can tell it was not given (an adapter's or an export's own
tail, say, then applies). Errors the user can fix (FlashbackError) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import signal
import sys
import threading
import time
import warnings
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path

from flashback.atomic import check_file, check_output
from flashback.cards import pick_slot
from flashback.config import (
    DEFAULT_INDEX_HELP,
    GGUF_TYPES,
    BenchConfig,
    DatasetSource,
    EngineConfig,
    EvalConfig,
    GenerationConfig,
    IndexConfig,
    PrepareConfig,
    Selection,
    ServeConfig,
    ServerLimits,
    TrainConfig,
)
from flashback.errors import FlashbackError
from flashback.registry import default_index_dir

# ---- flags from the configs ------------------------------------------------------------------------


def _comma_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def _flag_kwargs(f) -> dict:
    """argparse keywords for one config field: type from its annotation, help and default from the field."""
    meta, kind = f.metadata, str(f.type)
    shown = meta.get("default_help", "on" if f.default is True else "off" if f.default is False else f.default)
    more = {"choices": meta["choices"]} if "choices" in meta else {}
    more.update({k: meta[k] for k in ("nargs", "const") if k in meta})
    if "choices" not in meta:  # named after the flag, not after the field
        more["metavar"] = meta.get("metavar", meta.get("flag", f.name).upper().replace("-", "_"))
    help_text = meta["help"] + ("" if shown in (None, ()) or meta.get("negate") else f" (default: {shown})")
    if kind == "bool":
        return {"action": "store_false" if meta.get("negate") else argparse.BooleanOptionalAction, "help": help_text}
    if kind.startswith("tuple["):
        item = int if kind.startswith("tuple[int") else str
        if meta.get("comma"):
            return {"type": _comma_list(item), "help": help_text, **more}
        return {"action": "append", "type": item, "help": help_text, **more}
    item = {"int": int, "float": float}.get(kind.split(" |")[0], str)
    return {"type": item, "help": help_text, **more}


@dataclass(frozen=True)
class Fields:
    """Flags for these fields of a config class (all of them when `names` is empty)."""

    cls: type
    names: tuple[str, ...] = ()

    def add(self, parser: argparse.ArgumentParser) -> None:
        for f in fields(self.cls):
            if (self.names and f.name not in self.names) or (not self.names and f.metadata.get("hidden")):
                continue
            flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, **_flag_kwargs(f))


class Arg:
    """A flag or positional that is not a config field (paths, output switches)."""

    def __init__(self, *names: str, **kwargs):
        self.names, self.kwargs = names, kwargs

    def add(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.names, **self.kwargs)


def given(args: argparse.Namespace, name: str):
    """A flag's value when the user gave it, else None."""
    return getattr(args, name, None)


def config(cls, args: argparse.Namespace, **fixed):
    """The config the flags describe (with `fixed` on top), validated."""
    values = {}
    for f in fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
        elif f.default is MISSING:
            raise FlashbackError(f"--{f.name.replace('_', '-')} is required")
    cfg = cls(**{**values, **fixed})
    cfg.validate()
    return cfg


# ---- index / search --------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    from flashback.api import build_index

    start = time.perf_counter()
    cfg, sel = config(IndexConfig, args), config(Selection, args)
    index = build_index(
        args.corpus,
        args.out,
        builtin=cfg.builtin,
        model=config(EngineConfig, args).model,
        chunk_tokens=cfg.chunk_tokens,
        include=sel.include,
        exclude=sel.exclude,
        progress=not args.quiet,
    )
    m = index.manifest
    summary = {"out": str(args.out), "documents": m["num_documents"], "passages": m["num_passages"]}
    print(json.dumps({**summary, "tokens": m["num_tokens"], "seconds": round(time.perf_counter() - start, 1)}))
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


# ---- generate --------------------------------------------------------------------------------------
def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FlashbackError(f"cannot read prompt file {args.prompt_file}: {exc}") from None
    return args.prompt


def _checked_retriever(engine, index):
    from flashback.text.retrieval import IndexRetriever
    from flashback.text.tokenize import tokenizer_fingerprint

    if index is None:
        return None
    index.check_tokenizer(tokenizer_fingerprint(engine.tokenizer))
    return IndexRetriever(index)


def _generation_setup(args: argparse.Namespace, chat: bool = False):
    """(engine, retriever, generation config) of `generate` and `chat`: the mode's adapter for the endpoint (a
    chat's, where there is one), its layout settings unless the flags say otherwise, the index when the mode
    retrieves."""
    from flashback.engines.load import setup

    ecfg, cfg = config(EngineConfig, args), config(GenerationConfig, args)
    plan = setup(ecfg, cfg.mode, [cfg.mode], markers=given(args, "markers"), tail=given(args, "tail"), chat=chat)
    cfg = replace(cfg, markers=plan.markers, tail=plan.tail)
    index = _load_index(args.index) if cfg.mode != "none" else None
    engine = plan.load(markers=None if cfg.mode == "append" else False)  # only append mode places the markers
    return engine, _checked_retriever(engine, index), cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from flashback.generate import TextStreamer, generate, stream
    from flashback.text.tokenize import encode

    prompt = _read_prompt(args)
    if not prompt.strip():
        raise FlashbackError("the prompt is empty")
    engine, retriever, cfg = _generation_setup(args)
    prompt_ids = encode(engine.tokenizer, prompt)
    if args.json:
        print(json.dumps(generate(engine, prompt_ids, retriever, cfg).to_json(), ensure_ascii=False))
        return 0
    streamer = TextStreamer(engine.tokenizer)
    for token in stream(engine, prompt_ids, retriever, cfg):
        sys.stdout.write(streamer.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation in the terminal: each user line is one turn, answered with retrieval and streamed. From a pipe,
    each line of standard input is a turn; --json prints one object per turn."""
    from flashback.generate import TextStreamer, Trace, stream
    from flashback.text.chat_template import render

    engine, retriever, cfg = _generation_setup(args, chat=True)
    engine.keep_prefixes(256)  # each turn starts from the last one's cache (PyTorch engine)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty() and not args.json
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids, query = render(engine.tokenizer, messages, cfg.query_tokens)
        trace, streamer, tokens = Trace(cfg.mode), TextStreamer(engine.tokenizer), []
        for token in stream(engine, ids, retriever, cfg, trace, question=query):
            tokens.append(token)
            if not args.json:
                sys.stdout.write(streamer.push(token))
                sys.stdout.flush()
        answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        if args.json:
            turn = {"turn": len(messages) // 2, "text": answer, **trace.to_json()}
            print(json.dumps(turn, ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(streamer.flush() + "\n")


# ---- prepare / train -------------------------------------------------------------------------------
def _read_lines(path: str | None, flag: str) -> frozenset[str]:
    """The non-blank lines of a list file (titles, document ids), stripped."""
    if not path:
        return frozenset()
    try:
        return frozenset(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise FlashbackError(f"cannot read {flag} file {path}: {exc}") from None


def _documents(args: argparse.Namespace, sel: Selection, split: str):
    """The documents of TEXT files and/or --dataset, filtered; an empty source is an error before any slow work."""
    from flashback.text.corpus import dataset_documents, expand_paths, read_documents, select

    source = config(DatasetSource, args)
    if not args.text and source.dataset is None:
        raise FlashbackError("no text: give TEXT files or --dataset")
    expand_paths(args.text)  # fail on a bad path before the slow part
    dropped = _read_lines(sel.exclude_from, "--exclude-from")
    documents = read_documents(args.text)
    if source.dataset is not None:
        default = "train" if split == "train" else "test"  # prepare trains on train, eval scores test
        rows = list(dataset_documents(source.dataset, source.text_field, source.split, source.title_field, default))
        documents = itertools.chain(documents, rows)
    return select(documents, sel.include, sel.exclude, sel.heldout, split if sel.heldout else "all", dropped)


def cmd_prepare(args: argparse.Namespace) -> int:
    from flashback.data import prepare
    from flashback.text.tokenize import load_tokenizer, tokenizer_fingerprint

    cfg, sel, model = config(PrepareConfig, args), config(Selection, args), config(EngineConfig, args).model
    docs = _documents(args, sel, "train")
    forbid = _read_lines(sel.forbid_titles, "--forbid-titles")
    index = _load_index(args.index)
    tokenizer = load_tokenizer(model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    manifest = prepare(
        docs, tokenizer, model, fingerprint, index, args.index, args.out, cfg, forbid, not args.quiet, args.workers
    )
    print(json.dumps({"out": str(args.out), **manifest["counts"], "documents": manifest["documents"]}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flashback.distributed import join, launched, leave, peak_memory
    from flashback.engines.load import setup
    from flashback.train import check_outputs, throughput, train

    ecfg, cfg = config(EngineConfig, args), config(TrainConfig, args)
    if args.throughput and launched():
        raise FlashbackError("--throughput measures one process: run it without a launcher")
    world, device = join(ecfg.device)  # one process per device under torchrun / accelerate launch
    ecfg = replace(ecfg, device=device)
    try:
        if not args.throughput and world.main:
            check_outputs(args.out, args.resume)  # before the model loads
        engine = setup(ecfg, adapters=False).load(markers=cfg.markers)  # the bare model: training adds the adapter
        if args.throughput:
            print(json.dumps(throughput(engine, args.data[0], cfg, args.throughput)))
            return 0
        log = lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        data = args.data[0] if len(args.data) == 1 else args.data
        result = train(engine, data, args.out, cfg, resume=args.resume, log=log, progress=not args.quiet, world=world)
    finally:
        leave()
    if world.main:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        summary["target_tokens_per_s"] = round(result.target_tokens_per_s, 2)
        summary.update(peak_memory(device))  # rank 0's
        print(json.dumps({"out": str(args.out), "processes": world.size, **summary}))
    return 0


# ---- eval ------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from flashback.engines.load import setup
    from flashback.evaluate import ModeSpec, evaluate, format_table

    sel = config(Selection, args)
    if args.json:
        check_file(args.json)  # before the evaluation, whose results it keeps
    docs = _documents(args, sel, "heldout")
    specs = [ModeSpec.parse(m) for m in args.modes.split(",") if m.strip()]
    if not specs:
        raise FlashbackError("--modes is empty")
    # the shipped adapter only when a +adapter mode asks for one; each mode's markers come from --modes
    ecfg = config(EngineConfig, args, shipped_adapters=any(s.adapter for s in specs))
    plan = setup(ecfg, tail=given(args, "tail"))
    if any(s.adapter and pick_slot(plan.adapters, s.mode, chat=False) is None for s in specs):
        raise FlashbackError("a +adapter mode needs --adapter DIR: no adapter for that mode is shipped for this model")
    cfg = config(EvalConfig, args, tail=plan.tail)
    forbid = _read_lines(sel.forbid_titles, "--forbid-titles")
    index = _load_index(args.index)
    engine = plan.load(markers=any(s.markers or s.adapter for s in specs))
    _checked_retriever(engine, index)
    progress = lambda msg: print(f"[eval] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    results = evaluate(engine, docs, index, specs, cfg, forbid, progress=progress)
    print(format_table(results))
    if args.json:
        payload = {
            "config": cfg.__dict__,
            "index": str(args.index or default_index_dir()),
            "text": args.text,
            "dataset": given(args, "dataset"),
            "include": list(sel.include),
            "exclude": list(sel.exclude),
            "exclude_from": sel.exclude_from,
            "heldout": sel.heldout,
            "quantize": ecfg.quantize,
            "results": [r.to_json() for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


# ---- bench -----------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from flashback.bench import (
        LONG_NEW_TOKENS,
        PAPER_REGIME,
        format_comparison,
        format_table,
        long_contexts,
        new_tokens,
        plot,
        run_bench,
    )
    from flashback.engines.load import runs_export, setup

    if args.paper:  # the paper's runtime test, where the user set nothing else
        for name, value in PAPER_REGIME.items():
            if not hasattr(args, name):
                setattr(args, name, value)
    ecfg, bc = config(EngineConfig, args), config(BenchConfig, args)
    for path in (args.json, args.plot):
        if path:
            check_file(path)
    # a bare model times the markers too; an export, the layout it was tuned for
    plan = setup(ecfg, markers=given(args, "markers"), tail=given(args, "tail"), adapters=False, untuned_markers=None)
    bc = replace(bc, markers=plan.markers, tail=plan.tail, lora_overhead=bc.lora_overhead and not runs_export(ecfg))
    index = _load_index(args.index) if args.index else None
    step = bc.stride + bc.tail + bc.k * bc.passage_tokens + 2  # the bare forward of one step's tokens, too
    if bc.long:  # the lengths follow from the model's positions: load it first, at its whole context
        engine = plan.load()
        new = given(args, "new_tokens") or LONG_NEW_TOKENS
        passage = index.chunk_tokens if index is not None else bc.passage_tokens
        lengths = given(args, "context_lengths") or long_contexts(engine.max_positions, new + bc.k * passage + 2)
        repeats = given(args, "repeats") or 1
        bc = replace(bc, context_lengths=lengths, new_tokens=new, repeats=repeats, lora_overhead=False)
    else:
        context = max(length + max(new_tokens(bc, length), step) for length in bc.context_lengths) + step
        engine = plan.load(context=ecfg.context or context)
    if args.beside_torch and engine.capabilities.adapters:  # adapters unmerged: not an export's engine
        raise FlashbackError("--beside-torch compares an engine (--engine llamacpp or --upstream) with PyTorch")
    if _checked_retriever(engine, index) is None:
        print("flashback: passages are random tokens (no --index given)", file=sys.stderr)
    progress = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = run_bench(engine, bc, index, progress=progress)
    print(format_table(result))
    if args.beside_torch:  # the same export, contexts and passages on the PyTorch engine, in this run
        progress("the same export on the PyTorch engine")
        pytorch = replace(plan, cfg=replace(ecfg, engine="torch", upstream=None, flash_attn=False))
        torch_engine = pytorch.load()
        result["beside_torch"] = run_bench(torch_engine, bc, index, progress=progress)
        print("\nThe same export on the PyTorch engine:\n")
        print(format_table(result["beside_torch"]))
        print("\n" + format_comparison([result, result["beside_torch"]]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


def _chat_engine(args: argparse.Namespace):
    """(engine, index, generation config) for the chat bench and the QA evaluation: FlashBack's layout with the
    append adapter for chats (the shipped one, --adapter, or an export's), the other layouts on the bare model."""
    from flashback.engines.load import setup

    ecfg, cfg = config(EngineConfig, args), config(GenerationConfig, args, mode="append")
    plan = setup(ecfg, "append", ["append"], markers=given(args, "markers"), tail=given(args, "tail"), chat=True)
    cfg = replace(cfg, markers=plan.markers, tail=plan.tail)
    index = _load_index(args.index)
    engine = plan.load()
    _checked_retriever(engine, index)
    return engine, index, cfg


def _questions(args: argparse.Namespace):
    """The question set: the standard library's docstrings, or a glossary's entries (--entries)."""
    from flashback.qa import entry_questions, stdlib_questions
    from flashback.text.corpus import expand_paths

    if args.entries:
        expand_paths([args.entries])  # a missing file is one line, before the model loads
        return entry_questions(args.entries)
    return stdlib_questions()


def cmd_bench_chat(args: argparse.Namespace) -> int:
    from flashback.conversation import CHAT_LAYOUTS, ratios, run_conversation, summary
    from flashback.text.retrieval import IndexRetriever

    layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    if not layouts or any(v not in CHAT_LAYOUTS for v in layouts):
        raise FlashbackError(f"--layouts takes a comma-separated list of {', '.join(CHAT_LAYOUTS)}")
    if args.json:
        check_file(args.json)
    questions = [q.question for q in _questions(args.turns)]
    engine, index, cfg = _chat_engine(args)
    engine.keep_prefixes(args.cache_mb)  # a server's prefix cache: each turn may start from the last one's
    retriever = IndexRetriever(index)
    progress = lambda msg: print(f"[bench-chat] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    turns = run_conversation(
        engine,
        lambda q: retriever(q, cfg.k),
        questions,
        layouts,
        cfg,
        index.chunk_tokens,
        system=args.system,
        progress=progress,
    )
    last = len(questions)
    print(summary(turns, {1, (last + 1) // 2, last}))
    compared = ratios(turns, last)
    for name, r in compared.items():
        if name != "system":
            print(f"turn {last}, {name} / system: computed {r['computed']:.2f}x, first token {r['ttft']:.2f}x")
    if args.json:
        out = {
            "engine": engine.describe(),
            "config": {**vars(cfg), "turns": last, "system": args.system, "layouts": layouts},
            "turns": [vars(t) for t in turns],
            "ratios_at_last_turn": compared,
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def cmd_qa(args: argparse.Namespace) -> int:
    from flashback.qa import PASSAGE_SOURCES, ChatLayout, evaluate_qa, format_table, sample

    layouts = [ChatLayout.parse(v) for v in args.layouts.split(",") if v.strip()]
    if not layouts:
        raise FlashbackError("--layouts names no layout: none, system, user, flashback, flashback+adapter")
    sources = [v.strip() for v in args.passages.split(",") if v.strip()]
    if not sources or any(s not in PASSAGE_SOURCES for s in sources):
        raise FlashbackError(f"--passages takes a comma-separated list of {', '.join(PASSAGE_SOURCES)}")
    if args.json:
        check_file(args.json)
    if args.questions is not None and args.questions < 1:
        raise FlashbackError("--questions must be at least 1")
    progress = lambda msg: print(f"[qa] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.prepare:
        from flashback.data import DATA_FOLDER
        from flashback.qa import prepare_qa

        check_output(args.prepare, DATA_FOLDER)
        questions = _questions(args)
        if args.questions is not None:  # a spread of that many of the questions not held out
            questions = sample(questions, args.questions, heldout=False)
        engine, index, _ = _chat_engine(args)
        manifest = prepare_qa(engine, index, questions, args.prepare, args.system, progress=progress)
        print(json.dumps({"out": args.prepare, "counts": manifest["counts"]}))
        return 0
    questions = sample(_questions(args), args.questions or 100)
    engine, index, cfg = _chat_engine(args)
    results = evaluate_qa(
        engine, index, questions, layouts, cfg, sources, args.system, args.generate_tokens, progress=progress
    )
    print(format_table(results))
    if args.json:
        asked = Path(args.entries).name if args.entries else "stdlib docstrings"
        results["config"] = {**vars(cfg), "system": args.system, "questions": asked, "engine": engine.describe()}
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


# ---- export / serve --------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from flashback.atomic import check_output
    from flashback.export import EXPORT_FOLDER, check_gguf_type, export
    from flashback.registry import default_adapter

    check_gguf_type(args.gguf)  # before the progress line: an export that cannot finish does not start
    check_output(args.out, EXPORT_FOLDER)
    ecfg = config(EngineConfig, args)
    if len(ecfg.adapters) > 1:
        raise FlashbackError("an export merges one adapter: give one --adapter")
    adapter = ecfg.adapters[0] if ecfg.adapters else default_adapter(ecfg.model, "append")
    if adapter is None:
        raise FlashbackError("--adapter DIR is needed: no adapter is shipped for this model")
    print(f"merging {adapter} into {ecfg.model} ...", file=sys.stderr)
    card = export(adapter, args.out, model=ecfg.model, dtype=ecfg.dtype, gguf=args.gguf)
    print(json.dumps({"out": str(args.out), **card}))
    return 0


WARM_CAPACITIES = (512, 1024)  # the cache sizes most requests need: a prompt, a passage and up to ~800 new tokens


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from flashback.server import create_app, run
    except ImportError:
        raise FlashbackError("the server needs its extras: pip install 'flashback[server]'") from None
    from flashback.engines.load import setup

    ecfg, serve, limits = config(EngineConfig, args), config(ServeConfig, args), config(ServerLimits, args)
    mode = config(GenerationConfig, args).mode  # requests that name no mode get this one
    index = _load_index(args.index)
    plan = setup(ecfg, markers=given(args, "markers"), tail=given(args, "tail"), chat=None)
    engine, markers, tail = plan.load(), plan.markers, plan.tail
    held = engine.capabilities.sequences
    if held and limits.max_active > held:  # a generation beyond them would evict another's cache
        print(f"flashback: {engine.name} has {held} slot(s): --max-active {held}", file=sys.stderr)
        limits = replace(limits, max_active=held)
    retriever = _checked_retriever(engine, index)
    name = serve.served_model_name or Path(ecfg.model).name  # a folder's name, never where it lies
    app = create_app(
        engine,
        retriever,
        limits,
        markers=markers,
        tail=tail,
        docs=serve.docs,
        mode=mode,
        name=name,
        alias=ecfg.model,
        api_keys=serve.api_keys(),
        chat=(plan.chat_markers, plan.chat_tail),
    )
    if serve.warm_up and engine.warm_up(mode, WARM_CAPACITIES) is not None:
        sizes = ", ".join(map(str, WARM_CAPACITIES))
        print(f"flashback: compiling the decode step for {sizes}-token caches in the background", file=sys.stderr)
    run(app, serve.host, serve.port, limits)
    return 0


# ---- the table -------------------------------------------------------------------------------------
ENGINE = Fields(EngineConfig, ("model", "device", "dtype", "compile", "quantize", "engine", "flash_attn", "upstream"))
ADAPTERS = Fields(EngineConfig, ("adapters", "shipped_adapters"))
MODEL_ONLY = Fields(EngineConfig, ("model",))
INDEX = Arg("--index", default=None, help=DEFAULT_INDEX_HELP)
QUIET = Arg("--quiet", action="store_true", help="no progress bar")
TEXT = Arg("text", nargs="*", help=".txt/.md/.rst files, folders, .jsonl(.gz) with id/title/text (or --dataset)")
SELECT = Fields(Selection)
DATASET = Fields(DatasetSource)
SYSTEM = "You are a helpful assistant."
COMMANDS = {
    "index": (cmd_index, "split a corpus into passages and build a BM25 index", [
        Arg("corpus", nargs="*", help=".txt/.md/.rst files, folders, .jsonl(.gz) with id/title/text"),
        Arg("--out", required=True, help="index folder to write (replaced atomically)"),
        Fields(IndexConfig), MODEL_ONLY, Fields(Selection, ("include", "exclude")), QUIET]),
    "search": (cmd_search, "show the top BM25 passages for a query", [
        Arg("index", help="index folder"), Arg("query"), Arg("-k", "--k", type=int, default=3, help="passages"),
        Arg("--json", action="store_true", help="print a JSON list of hits")]),
    "generate": (cmd_generate, "generate with retrieval (append / prepend / none)", [
        ENGINE, ADAPTERS, INDEX, Fields(GenerationConfig),
        Arg("--json", action="store_true", help="print one JSON object: text, retrievals, forward passes, timings")]),
    "chat": (cmd_chat, "a conversation in the terminal, each answer retrieved for and streamed", [
        ENGINE, ADAPTERS, INDEX, Fields(GenerationConfig),
        Arg("--system", default=None, help="a system message to open the conversation"),
        Arg("--json", action="store_true", help="one JSON object per turn (text, retrievals, timings)")]),
    "prepare": (cmd_prepare, "turn running text into (context, passages, target) training examples", [
        TEXT, Arg("--index", required=True, help="index to retrieve passages from"),
        Arg("--out", required=True, help="data folder to write (train.jsonl, val.jsonl, manifest.json)"),
        MODEL_ONLY, Fields(PrepareConfig), DATASET, SELECT,
        Arg("--workers", type=int, default=1, metavar="N",
            help="segment documents in N processes (the output is the same as with one)"), QUIET]),
    "train": (cmd_train, "fine-tune a LoRA adapter + marker embeddings (base model frozen)", [
        Fields(EngineConfig, ("model", "device", "dtype", "threads")), Fields(TrainConfig),
        Arg("--data", required=True, action="append",
            help="folder written by `flashback prepare` (or `flashback qa --prepare`); repeat to mix several"),
        Arg("--out", required=True, help="adapter folder to write"),
        Arg("--resume", action="store_true", help="continue from OUT.checkpoint"),
        Arg("--throughput", type=int, default=0, metavar="N",
            help="measure target tokens/s packed vs per example on N segments (JSON) instead of training"), QUIET]),
    "eval": (cmd_eval, "perplexity of retrieval modes on the same target tokens", [
        TEXT, Fields(EngineConfig, ("model", "device", "dtype", "quantize", "adapters")), INDEX, Fields(EvalConfig),
        Arg("--modes", default="none,prepend,append",
            help="comma-separated: none, prepend, append, append+markers, and +adapter on any but none"),
        DATASET, SELECT, Arg("--json", help="write the results to this JSON file")]),
    "bench": (cmd_bench, "time append vs prepend generation across context lengths", [
        ENGINE, Fields(EngineConfig, ("threads",)), Fields(BenchConfig),
        Arg("--index", default=None, help="retrieve real passages from this index (default: random tokens)"),
        Arg("--paper", action="store_true",
            help="the FlashBack paper's runtime test: a 512-token context grown to 2,048 tokens, a random 128-token "
                 "passage every 16 tokens, no markers, the 16 new tokens re-encoded after the passage"),
        Arg("--beside-torch", action="store_true",
            help="with --engine llamacpp or --upstream: then time the same export on the PyTorch engine, in this run"),
        Arg("--json", help="write every row to this JSON file"),
        Arg("--plot", help="draw time vs context length to this PNG")]),
    "bench-chat": (cmd_bench_chat, "a conversation answered from the index in four layouts: cost per turn", [
        ENGINE, ADAPTERS, INDEX, Fields(GenerationConfig, ("k", "tail", "markers", "query_tokens", "max_new_tokens")),
        Arg("--turns", type=int, default=10, help="questions in the conversation (default: 10)"),
        Arg("--layouts", default="flashback,system,user,none",
            help="comma-separated: flashback, system (passages in the system message), user (before the question), "
                 "none (default: all four)"),
        Arg("--system", default=SYSTEM, help=f"the system message (default: {SYSTEM!r})"),
        Arg("--cache-mb", type=float, default=256, help="the PyTorch engine's prefix cache (default: 256)"),
        Arg("--json", help="write every turn to this JSON file")]),
    "qa": (cmd_qa, "grounded QA (stdlib docstrings or a glossary): answer perplexity and F1 per chat layout", [
        Fields(EngineConfig, ("model", "device", "dtype", "adapters", "shipped_adapters")), INDEX,
        Fields(GenerationConfig, ("k", "tail", "markers", "query_tokens", "stride", "chat_query")),
        Arg("--questions", type=int, default=None,
            help="questions to ask (default: 100); with --prepare, how many of the others to train on (default: all)"),
        Arg("--entries", metavar="FILE", default=None,
            help="ask about a glossary's entries instead (JSONL of id/title/text, e.g. the Jargon File): "
            "'What is TITLE?', answered by the definition's first sentence; --index must hold the entries"),
        Arg("--layouts", default="none,system,user,flashback,flashback+adapter",
            help="comma-separated: none, system, user, flashback, flashback+adapter (default: all)"),
        Arg("--passages", default="bm25,gold",
            help="comma-separated: bm25 (retrieved by the question), gold (the one holding the answer), live "
            "(FlashBack retrieves again every --stride tokens of the answer, queried as --chat-query says)"),
        Arg("--generate-tokens", type=int, default=32, help="greedy answer length for F1; 0: perplexity only"),
        Arg("--system", default=SYSTEM, help=f"the system message (default: {SYSTEM!r})"),
        Arg("--json", help="write the table and every question's scores to this JSON file"),
        Arg("--prepare", metavar="OUT", default=None,
            help="instead: write training data (`flashback prepare`'s format) from the modules not held out")]),
    "export": (cmd_export, "a plain model folder with the adapter and markers merged, for engines", [
        Fields(EngineConfig, ("model", "device", "dtype", "adapters")),
        Arg("--out", required=True, help="folder to write (replaced only if it is an earlier export)"),
        Arg("--gguf", choices=GGUF_TYPES, default=None,
            help="also write model-TYPE.gguf for llama.cpp (its converter; q4_1 then llama.cpp's quantizer)")]),
    "serve": (cmd_serve, "OpenAI-compatible HTTP completions with FlashBack retrieval", [
        ENGINE, ADAPTERS, INDEX, Fields(GenerationConfig, ("mode", "markers", "tail")), Fields(ServeConfig),
        Fields(ServerLimits)]),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashback",
        description="FlashBack: retrieval-augmented generation that appends retrieved passages after "
        "the context and reuses the KV cache, instead of prepending and recomputing.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text, items) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "generate":
            source = p.add_mutually_exclusive_group(required=True)
            source.add_argument("--prompt", help="prompt text")
            source.add_argument("--prompt-file", help="read the prompt from a file")
        for item in items:
            item.add(p)
        p.set_defaults(func=func)
    return parser


class Terminated(Exception):
    pass


def _terminated(signum, frame) -> None:
    raise Terminated


def _quiet_libraries() -> None:
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


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    # SIGTERM raises like Ctrl-C does, so `finally` blocks run: temporary output folders are removed.
    # (uvicorn installs its own handlers while `serve` runs.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if given(args, "threads"):
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except FlashbackError as exc:
        from tqdm import tqdm

        tqdm.write(f"flashback: error: {exc}", file=sys.stderr)  # on its own line, even under a progress bar
        return 2
    except KeyboardInterrupt:
        print("flashback: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("flashback: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
