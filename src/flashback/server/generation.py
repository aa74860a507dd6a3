"""One request's generation on the scheduler: the engine's token stream turned into text, stop strings,
log-probabilities and retrievals, step by step; and the service that admits requests and opens generations.

Everything that grows with the request runs off the event loop: tokenizing the prompt and rendering a chat on
the front thread (with its own tokenizer, so a huge prompt never holds up the model), stop strings,
log-probabilities and echo scoring on a model thread. Limits bound the prompt, the stop strings and a request's
total work before any of it starts. A request chooses settings but no paths: nothing it sends reads or writes
files.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import Request

from flashback.cards import for_endpoint, pick_slot
from flashback.config import MODES, EvalConfig, GenerationConfig, ServerLimits
from flashback.engines.base import Engine
from flashback.errors import FlashbackError
from flashback.evaluate import ModeSpec, scoring_steps, scoring_work
from flashback.generate import TextStreamer, Trace, stream
from flashback.layout import banned_ids, layout_settings, planned_work, without_markers
from flashback.server.protocol import DRAIN, GENERATION, CompletionRequest, Drain, ShuttingDown, Step
from flashback.server.scheduler import Scheduler, ignore_result, release_memory
from flashback.server.stops import StopFilter
from flashback.text.chat_template import render
from flashback.text.retrieval import Retriever
from flashback.text.tokenize import encode

END = object()  # a generation's token iterator is exhausted
FIRST = -float("inf")  # housekeeping (freeing a cache, handing memory back) runs before any step, credited ones too


@dataclass
class Generation:
    """One request's state; every method runs on the model thread."""

    engine: Engine
    req: CompletionRequest
    prompt_ids: list[int]
    tokens: object  # the generate.stream iterator
    trace: Trace
    start: float  # scheduler clock when admitted
    streamer: TextStreamer = field(init=False)
    stops: StopFilter = field(init=False)
    banned: torch.Tensor | None = field(init=False)  # the marking tokens, out of every logprob's softmax
    scoring: tuple | None = None  # (mode spec, eval config, retriever) when the echoed prompt is scored
    scored: int = 0  # token positions the echo scoring computed
    chunk: int = 0  # the scoring's token positions between two steps of the scheduler
    echoing: object = None  # the scoring in progress (evaluate.scoring_steps)
    echoed: bool = False
    count: int = 0
    reported: int = 0
    last_logits: torch.Tensor | None = None
    busy: threading.Lock = field(default_factory=threading.Lock)  # a step or close; workers > 1 may race them

    def __post_init__(self) -> None:
        self.streamer = TextStreamer(self.engine.tokenizer)
        self.stops = StopFilter(self.req.stop)
        self.banned = banned_ids(self.engine.marker_ids, self.engine.device)

    @property
    def priority(self) -> float:
        return self.start + self.scored + sum(f.tokens for f in self.trace.forwards)

    def observe(self, step: int, logits: torch.Tensor) -> None:
        self.last_logits = logits

    def _echo(self) -> Step:
        """The prompt itself (echo), with its log-probabilities when asked (the first token has none), scored as
        `flashback eval` scores a document in the request's mode (evaluate.scoring_steps), a chunk per step."""
        text = self.engine.tokenizer.decode(self.prompt_ids)  # as the tokens' own strings: text_offset points into it
        if self.scoring is None:
            self.echoed = True
            return Step(text, list(self.prompt_ids), [], [], None, len(self.prompt_ids), echo=True)
        if self.echoing is None:
            spec, cfg, retriever = self.scoring
            top = self.req.logprobs or 0
            self.echoing = scoring_steps(self.engine, self.prompt_ids, retriever, spec, cfg, top, self.chunk)
        try:
            self.scored = next(self.echoing)
            return self._tick()
        except StopIteration as done:
            scores = done.value
        self.echoed, self.scored = True, scores.work
        decode = self.engine.tokenizer.decode
        probs = [{"token": decode([self.prompt_ids[0]]), "logprob": None, "top": {}}]
        for token, logprob, best in zip(self.prompt_ids[1:], scores.logprobs, scores.top, strict=True):
            top: dict[str, float] = {}
            for i, value in best:  # best first: ids that decode alike keep the best one's value
                top.setdefault(decode([i]), value)
            probs.append({"token": decode([token]), "logprob": logprob, "top": top})
        return Step(text, list(self.prompt_ids), probs, scores.retrievals, None, len(self.prompt_ids), echo=True)

    def _tick(self) -> Step:
        """A step that produced nothing yet (a chunk of a prefill or of the scoring): the scheduler runs others."""
        return Step("", [], [], self._new_retrievals(), None, len(self.prompt_ids))

    def step(self) -> Step:
        with self.busy:
            step = self._step()
            step.cached_tokens = self.trace.cached_tokens
            return step

    def _step(self) -> Step:
        if self.req.echo and not self.echoed:
            return self._echo()
        token = next(self.tokens, END)
        if token is END:
            return Step(self._rest(), [], [], self._new_retrievals(), "length", len(self.prompt_ids))
        if token is None:  # a chunk of a prefill is done
            return self._tick()
        self.count += 1
        text = self.stops.push(self.streamer.push(token))
        probs = [self._logprob(self.last_logits, token)] if self.req.logprobs is not None else []
        finish = None
        if self.stops.stopped or token in self.engine.eos_ids:
            finish = "stop"
        elif self.count >= self.trace.max_new_tokens:
            finish = "length"
        if finish:
            text += self._rest()
        return Step(text, [token], probs, self._new_retrievals(), finish, len(self.prompt_ids))

    def _rest(self) -> str:
        """At the end: the held-back text, up to a stop string if one turns up in it."""
        text = self.stops.push(self.streamer.flush())
        return text + self.stops.flush()

    def close(self) -> None:
        with self.busy:
            self.tokens.close()  # frees the KV cache
            if self.echoing is not None:
                self.echoing.close()  # and the scoring's
            self.echoing = self.last_logits = None

    def _new_retrievals(self) -> list[dict]:
        new = self.trace.retrievals[self.reported :]
        self.reported = len(self.trace.retrievals)
        return new

    def _logprob(self, logits: torch.Tensor | None, token: int) -> dict:
        text = self.engine.tokenizer.decode([token])
        if logits is None:
            return {"token": text, "logprob": None, "top": {}}
        logp = torch.log_softmax(without_markers(logits.float(), self.banned), dim=-1)
        top = {}
        if self.req.logprobs:
            values, ids = logp.topk(self.req.logprobs)
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):  # best first: ids that decode alike
                top.setdefault(self.engine.tokenizer.decode([i]), v)  # keep the best one's value
        return {"token": text, "logprob": float(logp[token]), "top": top}


def scope(key: int | None, req: CompletionRequest) -> str | None:
    """The prefix-cache scope of a request: its API key's number, `cache_salt` and `user` (None: the shared one)."""
    parts = [key, req.cache_salt, req.user]
    return None if parts == [None, None, None] else json.dumps(parts)


class LockedRetriever:
    """One search at a time: a retriever (BM25 index, tokenizer) is not promised to be thread-safe, and a search
    takes milliseconds next to an upstream request's hundreds."""

    def __init__(self, retriever: Retriever):
        self.retriever = retriever
        self.lock = threading.Lock()
        self.max_passage_tokens = retriever.max_passage_tokens

    def __call__(self, query: str, k: int):
        with self.lock:
            return self.retriever(query, k)


def chat_layout(engine: Engine, markers: bool, tail: int) -> tuple[bool, int]:
    """(markers, tail) for chats when the caller gave only the completions': the layout the chat adapter was tuned
    with, where the engine holds its own one for append mode, else the completions'."""
    if pick_slot(engine.tuned, "append", chat=True) == pick_slot(engine.tuned, "append", chat=False):
        return markers, tail
    return layout_settings(for_endpoint(engine.tuned, chat=True), "append", None, None)


class CompletionService:
    """Turns requests into generations on the scheduler and their steps into OpenAI responses."""

    def __init__(
        self,
        engine: Engine,
        retriever: Retriever | None,
        limits: ServerLimits,
        markers: bool,
        tail: int,
        mode: str = GENERATION["mode"],
        name: str | None = None,
        alias: str | None = None,
        chat: tuple[bool, int] | None = None,
    ) -> None:
        self.engine, self.retriever, self.limits, self.markers, self.tail = engine, retriever, limits, markers, tail
        # (markers, tail) of chat requests: their adapter's layout
        self.chat_markers, self.chat_tail = chat if chat is not None else chat_layout(engine, markers, tail)
        self.name = name or engine.name  # the served model's name
        self.alias = alias  # another name a client may send for it (the --model string), never shown
        self.drainer = Drain()  # open streams, told when the server shuts down
        self.loop: asyncio.AbstractEventLoop | None = None
        self.mode = mode  # for requests that name no mode, in their fields or their model name
        workers = 1
        if engine.capabilities.remote:  # each admitted generation may wait on its own request to the engine
            workers = limits.max_active
            if retriever is not None:
                self.retriever = LockedRetriever(retriever)
        engine.keep_prefixes(limits.cache_mb)  # a conversation's next turn starts from the cache of the last
        self.reader = copy.deepcopy(engine.tokenizer)  # the front thread's own: tokenizers are not shared by threads
        self.front = ThreadPoolExecutor(1, thread_name_prefix="flashback-front")
        self.scheduler = Scheduler(workers, credit=limits.prefill_chunk)
        self.admission = asyncio.Semaphore(limits.max_active)
        self.state = {"active": 0, "waiting": 0, "served": 0}
        self.index_passages = len(retriever.index) if hasattr(retriever, "index") else None

    def health(self) -> dict:
        """GET /health: what is served, how, and the requests active, waiting and served so far."""
        return {
            "status": "ok",
            "model": self.name,
            "adapters": {slot: Path(path).name for slot, path in self.engine.adapters.items()},
            "tail": self.tail,
            "chat_tail": self.chat_tail,
            "mode": self.mode,
            "index_passages": self.index_passages,
            "warming_up": self.engine.warming_up(),  # cache sizes whose decode step still compiles in the background
            **self.state,
        }

    # -- on the front thread ---------------------------------------------------------------------
    def prompt(self, req: CompletionRequest) -> tuple[list[int], str | None]:
        """The request's token ids, and a chat's question (None for a completion, which queries the prompt's tail)."""
        if req._messages is None:
            return self.prompt_ids(req.prompt), None
        ids, question = render(self.reader, req._messages, req.query_tokens)
        return self._within_limit(ids, "the conversation"), question

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """One prompt's token ids. Text is tokenized as plain text (never special tokens); token ids may hold the
        model's own special tokens (scoring clients start a window with BOS or end-of-text), never the marking
        tokens, which only FlashBack places."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise FlashbackError("the prompt is empty")
            ids = encode(self.reader, prompt)
        else:
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= len(self.reader) for t in ids):
                raise FlashbackError("prompt: token ids must lie in this model's vocabulary")
            if set(ids) & set(self.engine.marker_ids or ()):
                raise FlashbackError("prompt: the marking tokens are FlashBack's own; a prompt may not hold them")
        if not ids:
            raise FlashbackError("the prompt is empty")
        return self._within_limit(ids, "the prompt")

    def _within_limit(self, ids: list[int], what: str) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise FlashbackError(f"{what} has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}")
        return ids

    # -- on the model thread ---------------------------------------------------------------------
    def open(
        self,
        req: CompletionRequest,
        prompt: tuple[list[int], str | None],
        start: float,
        budget: int | None = None,
        key: int | None = None,
    ) -> Generation:
        """The request's generation, validated, for its `prompt` (see `prompt`). It may start from a kept prefix
        cache only of a request with the same API key, `cache_salt` and `user`."""
        ids, question = prompt
        if req.mode != "none" and self.retriever is None:
            raise FlashbackError("this server has no index; use mode 'none'")
        chat = question is not None  # a chat's answer: its adapter and layout
        markers, tail = (self.chat_markers, self.chat_tail) if chat else (self.markers, self.tail)
        cfg = GenerationConfig(
            mode=req.mode,
            stride=req.stride,
            query_tokens=req.query_tokens,
            k=req.k,
            max_new_tokens=req.max_tokens or 16,
            markers=markers and req.mode == "append",
            tail=tail if req.tail is None else req.tail,
            chat_query=req.chat_query,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        passage = self.retriever.max_passage_tokens if self.retriever is not None else 0
        work = planned_work(cfg, len(ids), passage)
        scoring = self._scoring(req, cfg) if req.echo and req.logprobs is not None else None
        if scoring is not None:
            work += scoring_work(len(ids), scoring[1], passage, req.mode)
        budget = self.limits.max_request_work if budget is None else budget
        if work > budget:
            shared = "" if budget == self.limits.max_request_work else " for each prompt of this batch"
            raise FlashbackError(
                f"this request would compute up to {work} token positions; the limit is {budget}{shared} "
                "(fewer max_tokens, a larger stride, a smaller k, or mode append)"
            )
        trace = Trace(req.mode)
        chunk = self.limits.prefill_chunk
        start = self.scheduler.place(start, work)
        gen = Generation(self.engine, req, ids, None, trace, start, scoring=scoring, chunk=chunk)
        observe = gen.observe if req.logprobs is not None else None  # logits are kept only when asked for
        gen.tokens = stream(  # validates now
            self.engine,
            ids,
            self.retriever,
            cfg,
            trace,
            observe,
            chunk,
            question,
            cache_salt=scope(key, req),
        )
        return gen

    def _scoring(self, req: CompletionRequest, cfg: GenerationConfig) -> tuple:
        """How an echoed prompt is scored: `flashback eval`'s settings taken from the request."""
        spec = ModeSpec(req.mode, markers=cfg.markers, adapter=self.engine.adapter_for(req.mode) is not None)
        settings = {"stride": cfg.stride, "query_tokens": cfg.query_tokens, "k": cfg.k, "tail": cfg.tail}
        if req.max_length is not None:
            if req.max_length > self.engine.max_positions:
                raise FlashbackError(f"max_length may be at most the model's {self.engine.max_positions} positions")
            settings["max_length"] = req.max_length
        ecfg = EvalConfig(**settings)
        passages = ecfg.k * self.retriever.max_passage_tokens if self.retriever is not None else 0
        least = passages + 2 + ecfg.stride + 2 * ecfg.query_tokens  # eval's segments need twice the query as context
        if ecfg.max_length < least:  # in the request's terms (eval's own message names its command-line flags)
            given = "" if req.max_length is not None else " (the default)"
            raise FlashbackError(
                f"max_length {ecfg.max_length}{given} leaves too little room: k={ecfg.k} passages, the markers, a "
                f"{ecfg.stride}-token stride and twice {ecfg.query_tokens} query tokens need at least {least}"
            )
        return spec, ecfg, self.retriever

    # -- on the event loop -----------------------------------------------------------------------
    def drain(self) -> None:
        """The server is shutting down: every open stream ends now, new requests are refused (safe to call from a
        signal handler)."""
        self.drainer.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.drainer.stopping.set)
            self.loop.call_soon_threadsafe(lambda: [q.put_nowait(DRAIN) for q in list(self.drainer.queues)])

    def model_names(self) -> list[str]:
        """The served names: the model, and the model in each mode (for clients that send only OpenAI's fields)."""
        return [self.name, *(f"{self.name}:{mode}" for mode in MODES)]

    def resolve(self, req: CompletionRequest) -> CompletionRequest:
        """The request with its mode settled: its `mode` field, else the one its model name picks, else the
        server's."""
        names = self.model_names()
        if self.alias and req.model is not None and req.model.startswith(self.alias):  # NAME as the client knows it
            req = req.model_copy(update={"model": self.name + req.model[len(self.alias) :]})
        if req.model is not None and req.model not in names:
            raise FlashbackError(f"model {req.model!r} is not served here; this server serves {', '.join(names)}")
        named = req.model.rpartition(":")[2] if req.model and req.model != self.name else None
        if req.mode is not None and named is not None and req.mode != named:
            raise FlashbackError(f"mode {req.mode!r} contradicts the model name {req.model!r}")
        return req.model_copy(update={"mode": req.mode or named or self.mode})

    def check(self, req: CompletionRequest) -> None:
        """Cheap checks that need no tokenizer, so a bad request costs nothing on the model thread."""
        if req.max_length is not None and not (req.echo and req.logprobs is not None):
            raise FlashbackError("max_length sets how an echoed prompt is scored: send it with echo and logprobs")
        if req._messages is not None:  # each message with text holds at least one token: refused before rendering
            least = sum(1 for m in req._messages if m["content"].strip())
            if least > self.limits.max_prompt_tokens:
                raise FlashbackError(
                    f"the conversation has {least} messages with text, so at least as many tokens; the limit is "
                    f"{self.limits.max_prompt_tokens}"
                )
        if (req.max_tokens or 16) > self.limits.max_tokens:
            raise FlashbackError(f"max_tokens may be at most {self.limits.max_tokens}")
        problem = req.unsupported()
        if problem:
            raise FlashbackError(problem)
        if req.logprobs is not None and self.engine.capabilities.logits == "none":
            raise FlashbackError("logprobs are not available here: an upstream engine decodes (serve --upstream)")
        if req.echo and req.logprobs is not None and self.engine.capabilities.logits != "all":
            raise FlashbackError("echo with logprobs scores the prompt with the PyTorch engine only")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > self.limits.max_stop:
            raise FlashbackError(f"stop: at most {self.limits.max_stop} stop strings")
        if any(len(s) > self.limits.max_stop_chars for s in stops):
            raise FlashbackError(f"stop: each stop string may have at most {self.limits.max_stop_chars} characters")

    async def _admit(self) -> None:
        """Wait for a slot (--max-active). A shutdown answers every waiting request at once, with ShuttingDown."""
        acquire = asyncio.ensure_future(self.admission.acquire())
        stop = asyncio.ensure_future(self.drainer.stopping.wait())
        admitted = False
        try:
            await asyncio.wait((acquire, stop), return_when=asyncio.FIRST_COMPLETED)
            admitted = acquire.done() and not self.drainer.draining
        finally:  # also when the client hung up while waiting: a slot taken meanwhile goes back
            stop.cancel()
            if not admitted:
                acquire.cancel()
                if acquire.done() and not acquire.cancelled():
                    self.admission.release()
        if not admitted:
            raise ShuttingDown()

    async def steps(
        self, req: CompletionRequest, request: Request, work: int | None = None, key: int | None = None
    ) -> AsyncIterator[Step]:
        """Admit the request, then yield its steps; the echo comes first when asked. `work` is its budget of token
        positions (a batch's prompts share the request's); `key` the number of the API key it came with."""
        if self.drainer.draining:
            raise ShuttingDown()
        req = self.resolve(req)
        self.check(req)
        self.loop = asyncio.get_running_loop()
        self.state["waiting"] += 1
        try:
            prompt = await self.loop.run_in_executor(self.front, self.prompt, req)
            await self._admit()
        finally:
            self.state["waiting"] -= 1
        self.state["active"] += 1
        gen, steps = None, None
        try:
            start = self.scheduler.arrival()
            gen = await self.scheduler.submit(start, lambda: self.open(req, prompt, start, work, key))
            steps = self.scheduler.stream(gen)  # the echo first, when asked
            while True:
                step = await steps.next()
                yield step
                if step.finish:
                    return
                if not req.stream and await request.is_disconnected():
                    return  # nobody is waiting for the answer
        finally:  # no await here: a hung-up client cancels this task, and the slot must still be freed
            if steps is not None:
                steps.cancel()
            if gen is not None:  # frees the KV cache after any step in flight (gen.busy)
                with suppress(FlashbackError):
                    self.scheduler.submit(FIRST, gen.close).add_done_callback(ignore_result)
            self.state["active"] -= 1
            self.state["served"] += 1
            if self.state["active"] == 0:  # the last request ended: hand its peak memory back
                with suppress(FlashbackError):
                    self.scheduler.submit(FIRST, release_memory).add_done_callback(ignore_result)
            self.admission.release()
