"""Every setting FlashBack has, once: the config dataclasses, their defaults, their help, their checks.

The CLI's flags are generated from these fields (cli.py): a field's name is its flag, its default the
flag's default, `metadata["help"]` its help text. `validate()` is the only place a setting is checked,
so the CLI, the Python API and the server refuse the same things with the same words.
Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from flashback.errors import FlashbackError, first_line
from flashback.registry import DEFAULT_MODEL, default_index_dir

MODES = ("append", "prepend", "none")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8",)
COMPILE = ("auto", "on", "off")
ENGINES = ("torch", "llamacpp")
GGUF_TYPES = ("f16", "q8_0", "q4_1")
# Context tokens placed after the passage when neither the user nor an adapter's card says otherwise.
DEFAULT_TAIL = 32
# The paper's settings, the defaults wherever they apply: a retrieval every 16 tokens, queried with the last 32,
# one passage of 128 model tokens; examples of at most 512 positions.
STRIDE = 16
QUERY_TOKENS = 32
# What a chat's retrievals after the first query (completions always query the last `query_tokens` tokens, as the
# paper does): the last tokens alone, the question and the answer's last tokens, or the question alone.
CHAT_QUERIES = ("recent", "question+recent", "question")
CHAT_QUERY = "question+recent"
PASSAGES = 1
PASSAGE_TOKENS = 128
MAX_LENGTH = 512


def compile_setting(value) -> str:
    """--compile as one of COMPILE; True and False (the older boolean setting) read as on and off."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def opt(default, help: str, **cli):
    """A config field with its CLI help. `cli` may set: flag (another flag name), negate (a store_false flag
    such as --no-adapter), choices, metavar, hidden (no flag), default_help (what the help calls the default),
    nargs and const (a flag that may stand alone)."""
    return field(default=default, metadata={"help": help, **cli})


def _at_least(config, names: tuple[str, ...], low: float = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            word = "at least 1" if low == 1 else f">= {low}"
            raise FlashbackError(f"--{name.replace('_', '-')} must be {word}")


def _one_of(value, allowed: tuple, what: str) -> None:
    if value is not None and value not in allowed:
        raise FlashbackError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class EngineConfig:
    """Which model runs where: the PyTorch engine, llama.cpp on an export, or an inference server upstream."""

    model: str = opt(
        DEFAULT_MODEL,
        "a named model (smollm2-135m, gemma3-270m), a Hugging Face model directory or hub id, or an export folder "
        "for the engines",
        default_help=f"{DEFAULT_MODEL}, installed offline",
    )
    device: str = opt("cpu", "cpu or cuda")
    dtype: str = opt("float32", "weights' dtype (PyTorch engine)", choices=DTYPES)
    compile: str = opt(
        "auto",
        "the PyTorch engine's decode step: on = torch.compile'd (faster per token once compiled, which takes about "
        "a minute the first time on 2 cores), off = eager, auto = compile when the tokens left to decode repay it, "
        "as measured (--compile alone: on)",
        choices=COMPILE,
        nargs="?",
        const="on",
    )
    quantize: str | None = opt(
        None,
        "int8 weight-only quantization of the decode weights (with --compile; eval: every forward)",
        choices=QUANTIZE,
    )
    engine: str = opt(
        "torch", "llamacpp: run a `flashback export --gguf` folder (--model DIR) in llama.cpp", choices=ENGINES
    )
    flash_attn: bool = opt(
        False, "--engine llamacpp: flash attention (faster prefill and extends; off by default, as measured)"
    )
    upstream: str | None = opt(
        None,
        "decode on an inference server at URL (llama-server, or vLLM's OpenAI API) "
        "that serves the export given as --model DIR; retrieval and layout stay here",
        metavar="URL",
    )
    adapters: tuple[str, ...] = opt(
        (),
        "LoRA adapter folder from `flashback train`; it serves the mode it was trained for (repeatable)",
        flag="adapter",
        metavar="DIR",
        default_help="the adapters shipped for the named model (smollm2-135m, gemma3-270m)",
    )
    shipped_adapters: bool = opt(True, "do not use the shipped default adapters", flag="no-adapter", negate=True)
    threads: int | None = opt(None, "CPU threads", default_help="torch's choice")
    context: int | None = opt(None, "llama.cpp context size in tokens", hidden=True, default_help="the model's")

    def __post_init__(self) -> None:
        object.__setattr__(self, "compile", compile_setting(self.compile))

    def validate(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            raise FlashbackError(f"unknown --device {self.device!r}; choose cpu, cuda, cuda:N or mps")
        _one_of(self.dtype, DTYPES, "dtype")
        _one_of(self.quantize, QUANTIZE, "--quantize")
        _one_of(self.compile, COMPILE, "--compile")
        _one_of(self.engine, ENGINES, "--engine")
        _at_least(self, ("threads", "context"))
        if self.flash_attn and self.engine != "llamacpp":
            raise FlashbackError("--flash-attn applies to --engine llamacpp only")
        if self.upstream and self.engine != "torch":
            raise FlashbackError("choose one of --engine llamacpp and --upstream")


@dataclass(frozen=True)
class GenerationConfig:
    mode: str = opt("append", "append = FlashBack, prepend = In-Context RALM, none = no retrieval", choices=MODES)
    stride: int = opt(STRIDE, "retrieve every N generated tokens")
    query_tokens: int = opt(QUERY_TOKENS, "query = the last N tokens")
    k: int = opt(PASSAGES, "passages per retrieval, concatenated")
    max_new_tokens: int = opt(64, "tokens to generate at most")
    markers: bool = opt(
        True,
        "append mode: wrap passages in <MARK_L> ... <MARK_R>",
        default_help="on where the adapter or export was trained with them",
    )
    tail: int = opt(
        DEFAULT_TAIL,
        "append mode: put the passage this many context tokens before the end of the context",
        default_help=f"the adapter's own, else {DEFAULT_TAIL}",
    )
    chat_query: str = opt(
        CHAT_QUERY,
        "chat: the query of the retrievals after the first: the last query-tokens tokens (the paper's), the question "
        "and the answer's last tokens, or the question alone (completions always query the last tokens)",
        choices=CHAT_QUERIES,
    )
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens with this probability")
    seed: int | None = opt(None, "sampling seed")
    stop_at_eos: bool = opt(True, "stop at an end-of-sequence token (benchmarks generate a fixed number)", hidden=True)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise FlashbackError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.chat_query not in CHAT_QUERIES:
            raise FlashbackError(f"unknown chat query {self.chat_query!r}; choose one of {', '.join(CHAT_QUERIES)}")
        for name in ("stride", "query_tokens", "k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise FlashbackError(f"{name.replace('_', '-')} must be at least 1")
        if self.tail < 0:
            raise FlashbackError("tail must be >= 0")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise FlashbackError("temperature must be a finite number >= 0")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise FlashbackError("seed must be between 0 and 2**64 - 1")
        if not 0 < self.top_p <= 1:
            raise FlashbackError("top-p must be in (0, 1]")


@dataclass(frozen=True)
class Selection:
    """Which documents of a corpus a command reads."""

    include: tuple[str, ...] = opt(
        (), "keep only documents whose id matches (repeatable), e.g. 'python:library/*'", metavar="GLOB"
    )
    exclude: tuple[str, ...] = opt((), "drop documents whose id matches (repeatable)", metavar="GLOB")
    exclude_from: str | None = opt(
        None, "file of document ids to drop, one a line (e.g. copies of an evaluation corpus)", metavar="FILE"
    )
    heldout: float = opt(
        0.0,
        "hashed fraction of documents held out of training: prepare leaves it out, eval "
        "scores only it (give both the same value)",
    )
    forbid_titles: str | None = opt(None, "file of titles never to retrieve, one a line", metavar="FILE")

    def validate(self) -> None:
        if not 0 <= self.heldout < 1:
            raise FlashbackError("--heldout must be in [0, 1)")


@dataclass(frozen=True)
class DatasetSource:
    """Documents from a Hugging Face `datasets` dataset instead of (or beside) text files."""

    dataset: str | None = opt(
        None,
        "a dataset: a folder saved with save_to_disk, a parquet/JSON/CSV file, or a hub name (needs network)",
        metavar="DATASET",
    )
    text_field: str = opt("text", "the dataset's column of text")
    title_field: str | None = opt(None, "its column of titles (the leakage filter never retrieves a document's title)")
    split: str | None = opt(
        None, "the split to read", default_help="the only one, else train for prepare, test for eval"
    )

    def validate(self) -> None:
        if self.dataset is not None and not self.text_field:
            raise FlashbackError("--text-field is empty")


@dataclass(frozen=True)
class IndexConfig:
    builtin: str | None = opt(
        None,
        "also index a corpus every Python has: python-docs = the reference topics of "
        "help() and the standard-library module docs (offline, ~4.7M characters)",
        choices=("python-docs",),
    )
    chunk_tokens: int = opt(PASSAGE_TOKENS, "passage length in model tokens")

    def validate(self) -> None:
        _at_least(self, ("chunk_tokens",))


@dataclass(frozen=True)
class PrepareConfig:
    stride: int = opt(STRIDE, "target tokens per example")
    query_tokens: int = opt(QUERY_TOKENS, "query = the N tokens before each target")
    k: int = opt(PASSAGES, "passages per example")
    max_length: int = opt(MAX_LENGTH, "context + markers + passages + target")
    val_fraction: float = opt(0.05, "documents set aside for validation")
    max_segments: int | None = opt(None, "keep a seeded sample of this many segments (text windows)")
    seed: int = opt(0, "seed of the validation split and the sample")
    batch_queries: int = opt(512, "BM25 queries per batch", hidden=True)

    def validate(self) -> None:
        if min(self.stride, self.query_tokens, self.k, self.max_length) < 1 or not 0 <= self.val_fraction < 1:
            raise FlashbackError("stride, query-tokens, k and max-length must be positive; val-fraction in [0, 1)")
        _at_least(self, ("max_segments", "batch_queries"))


@dataclass(frozen=True)
class TrainConfig:
    mode: str = opt(
        "append",
        "the layout to train for: append (FlashBack) or prepend (In-Context RALM)",
        choices=("append", "prepend"),
    )
    markers: bool = opt(True, "wrap passages in the two learned marking tokens")
    tail: int | None = opt(
        None,
        "append: context tokens placed after the passage (0 = the paper's layout)",
        default_help=f"{DEFAULT_TAIL} for append, 0 for prepend",
    )
    pack: bool = opt(True, "append: train all targets of a segment in one forward over a shared prefix")
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha")
    dropout: float = opt(0.05, "LoRA dropout")
    target_modules: tuple[str, ...] = opt(
        ("all-linear",), "comma-separated linear layer names, or all-linear (every one but the output head)", comma=True
    )
    lr: float = opt(3e-4, "learning rate")
    marker_lr: float | None = opt(None, "learning rate of the marker rows", default_help="--lr")
    early_weight: float = opt(1.0, "loss weight of the first --early-tokens target tokens")
    early_tokens: int = opt(2, "target tokens that --early-weight applies to")
    weight_decay: float = opt(0.0, "AdamW weight decay", hidden=True)
    batch_size: int = opt(1, "segments per step and process when packing, else examples")
    grad_accum: int = opt(1, "micro-steps of gradient accumulation (global batch: batch size x this x processes)")
    epochs: float = opt(1.0, "passes over the training data")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    warmup_steps: int = opt(20, "linear warm-up steps")
    eval_every: int = opt(50, "validate every N steps")
    save_every: int = opt(50, "checkpoint every N steps")
    max_val_segments: int = opt(8, "validation segments, spread over the split")
    max_grad_norm: float = opt(1.0, "gradient clipping", hidden=True)
    seed: int = opt(0, "seed of the data order and the adapter's initialisation")
    autocast: str = opt(
        "auto",
        "bf16 matmuls over fp32 weights; auto = where the hardware runs bf16 natively",
        choices=("auto", "bfloat16", "none"),
    )
    gradient_checkpointing: bool = opt(
        False, "recompute activations in the backward pass: less memory for long segments or large models, ~30% slower"
    )

    def __post_init__(self) -> None:
        if self.tail is None:  # the layout's own default: prepend has no tail
            object.__setattr__(self, "tail", DEFAULT_TAIL if self.mode == "append" else 0)

    def validate(self) -> None:
        if self.mode not in ("append", "prepend"):
            raise FlashbackError("--mode must be append or prepend")
        if self.markers and self.mode != "append":
            raise FlashbackError("markers only make sense with --mode append")
        if self.tail and self.mode != "append":
            raise FlashbackError("--tail only makes sense with --mode append")
        _at_least(self, ("r", "alpha", "batch_size", "grad_accum", "eval_every", "save_every", "max_steps"))
        if self.tail < 0 or self.early_tokens < 0 or self.early_weight <= 0:
            raise FlashbackError("--tail and --early-tokens must be >= 0, --early-weight > 0")
        if not self.target_modules:
            raise FlashbackError("--target-modules is empty")
        _one_of(self.autocast, ("auto", "bfloat16", "none"), "--autocast")

    @property
    def packed(self) -> bool:
        return self.pack and self.mode == "append"


@dataclass(frozen=True)
class EvalConfig:
    stride: int = opt(STRIDE, "target tokens per retrieval")
    query_tokens: int = opt(QUERY_TOKENS, "query = the N tokens before each target")
    k: int = opt(PASSAGES, "passages per target")
    max_length: int = opt(MAX_LENGTH, "context + markers + passages + target")
    limit_tokens: int | None = opt(None, "score about this many tokens, spread evenly")
    min_context: int | None = opt(
        None, "score only targets with at least N tokens of context before them (a long-context evaluation)"
    )
    ensemble: bool = opt(False, "mix per-passage probabilities instead of concatenating")
    fast: bool = opt(True, "score every example from scratch (no shared cache)", flag="slow", negate=True)
    tail: int = opt(
        DEFAULT_TAIL,
        "append modes: context tokens after the passage",
        default_help=f"the adapter's own, else {DEFAULT_TAIL}",
    )

    def validate(self) -> None:
        if min(self.stride, self.query_tokens, self.k, self.max_length) < 1:
            raise FlashbackError("stride, query-tokens, k and max-length must be at least 1")
        if self.tail < 0:
            raise FlashbackError("--tail must be >= 0")
        _at_least(self, ("limit_tokens", "min_context"))


@dataclass(frozen=True)
class BenchConfig:
    context_lengths: tuple[int, ...] = opt((512, 1024, 2048, 4096), "comma-separated context lengths", comma=True)
    new_tokens: int = opt(128, "tokens generated per run")
    total_length: int | None = opt(
        None, "instead, generate until the sequence holds this many tokens (the paper's runtime test: 2048)"
    )
    stride: int = opt(STRIDE, "retrieve every N generated tokens")
    passage_tokens: int = opt(PASSAGE_TOKENS, "random-passage length (without --index)")
    query_tokens: int = opt(QUERY_TOKENS, "query = the last N tokens", hidden=True)
    k: int = opt(PASSAGES, "passages per retrieval")
    repeats: int = opt(3, "timed runs per mode and length (after a warm-up)")
    markers: bool = opt(
        True, "append: wrap passages in the marking tokens", default_help="on, or as the export was trained"
    )
    tail: int = opt(
        DEFAULT_TAIL,
        "append: context tokens re-encoded after the passage at each retrieval",
        default_help=f"the export's own, else {DEFAULT_TAIL}",
    )
    lora_overhead: bool = opt(True, "skip the unmerged-vs-merged LoRA measurement", flag="no-lora", negate=True)
    lora_targets: tuple[str, ...] = opt(("all-linear",), "LoRA targets of that measurement", hidden=True)
    seed: int = opt(0, "seed of random contexts and passages", hidden=True)
    long: bool = opt(
        False,
        "long contexts: 8,192 / 16,384 / 32,768 tokens as the model's positions allow (else the largest thousand "
        "that fits), 32 new tokens, one run per mode, one short warm-up",
    )

    def validate(self) -> None:
        _at_least(self, ("new_tokens", "stride", "passage_tokens", "k", "repeats", "query_tokens"))
        if not self.context_lengths or min(self.context_lengths) < 1:
            raise FlashbackError("--context-lengths must be positive integers")
        if self.total_length is not None and self.total_length <= max(self.context_lengths):
            raise FlashbackError("--total-length must exceed every context length")
        if self.tail < 0:
            raise FlashbackError("--tail must be >= 0")


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_tokens: int = opt(4096, "largest prompt in tokens")
    max_tokens: int = opt(512, "largest max_tokens a request may ask for")
    max_active: int = opt(8, "generations in flight; more requests wait")
    max_body_bytes: int = opt(1 << 20, "largest request body", default_help="1 MiB")
    max_batch: int = opt(32, "prompts in one request (a batch: one choice each)")
    max_stop: int = opt(4, "stop strings per request (OpenAI's own limit)", hidden=True)
    max_stop_chars: int = opt(256, "characters per stop string", hidden=True)
    max_request_work: int = opt(262_144, "token positions one request may compute, retrieval recomputation included")
    prefill_chunk: int = opt(
        256, "long prefills and echo scoring run this many token positions at a time, other requests between them"
    )
    cache_mb: float = opt(
        256.0,
        "MiB of finished requests' KV caches kept (without their passages) for requests that start with the same "
        "tokens, such as a conversation's next turn (PyTorch engine; 0: off)",
    )
    read_timeout_s: float = opt(
        10.0,
        "seconds a client has to send a request's headers, and its body (plus a second per 16 KiB received)",
        flag="read-timeout",
    )
    shutdown_grace_s: float = opt(
        5.0,
        "after SIGTERM: open streams end at once, requests without a stream get this many seconds",
        flag="shutdown-grace",
    )

    def validate(self) -> None:
        names = ("max_prompt_tokens", "max_tokens", "max_active", "max_body_bytes", "max_batch", "max_stop")
        _at_least(self, ("max_request_work", "prefill_chunk"))
        _at_least(self, names)
        if self.shutdown_grace_s < 0:
            raise FlashbackError("--shutdown-grace must be >= 0")
        if not self.cache_mb >= 0:
            raise FlashbackError("--cache-mb must be >= 0")
        if not self.read_timeout_s > 0:
            raise FlashbackError("--read-timeout must be > 0")


@dataclass(frozen=True)
class ServeConfig:
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "TCP port")
    docs: bool = opt(False, "serve the OpenAPI page at /docs")
    served_model_name: str | None = opt(
        None, "the model's name in requests and answers", default_help="the model folder's name"
    )
    warm_up: bool = opt(
        True,
        "with --compile auto: compile the decode step for 512- and 1,024-token caches in the background at start-up",
    )
    api_key: tuple[str, ...] = opt(
        (),
        "a key clients must send as Authorization: Bearer KEY (repeatable); the prefix cache is kept apart per key",
        metavar="KEY",
    )
    api_key_file: str | None = opt(None, "a file of API keys, one per line (blank lines and # comments skipped)")

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FlashbackError(f"--port {self.port} is not a TCP port (0-65535)")
        self.api_keys()

    def api_keys(self) -> tuple[str, ...]:
        """The keys of --api-key and --api-key-file; none: the server is open to anyone who reaches it."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                lines = Path(self.api_key_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise FlashbackError(f"--api-key-file {self.api_key_file}: {first_line(exc)}") from None
            found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not found:
                raise FlashbackError(f"--api-key-file {self.api_key_file} holds no key")
            keys += found
        for key in keys:
            if not key or not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
                raise FlashbackError("an API key must be printable ASCII without spaces")
        return tuple(keys)


DEFAULT_INDEX_HELP = f"index folder (default: {default_index_dir()}, built on first use)"


def defaults(cls) -> dict:
    """A config class's defaults by field name (the server's request schema reads them)."""
    return {f.name: f.default for f in fields(cls)}
