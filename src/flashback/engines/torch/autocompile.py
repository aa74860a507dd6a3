"""`--compile auto`: compile the decode step only when the tokens left to decode repay the compile.

A generation starts eager. After a few eager decode steps it knows what a token costs on this machine, and
it knows how many tokens it still has to decode; it compiles when

    remaining tokens x (eager s/token - compiled s/token) > expected compile time

and stays eager otherwise, so a short answer never waits for Inductor while a long generation gets the
faster step. The compiled cost per token and the compile time come from earlier runs of the same model and
cache capacity on this machine (a small JSON file in FlashBack's cache folder), or from defaults measured on
a 2-core CPU until such a run exists. Compile time is "cold" when Inductor's on-disk cache (kept under the same
folder) has not seen this graph and "warm" when it has; a graph already compiled in this process costs nothing.
Every choice is reported with its figures (the generation trace's `compile`).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path

import torch

from flashback.registry import cache_root

EAGER_STEPS = 4  # eager decode steps timed before choosing (the median: the first can carry one-time costs)
# Until this machine has compiled the graph once: SmolLM2-135M on this project's 2-core CPU, fp32, a 2,048-token
# buffer (scripts/lab/compile_default.py, docs/results.md#compile-auto): compiled 37.9 ms/token against 58.8 eager,
# compiling 60.2 s cold and 14.4 s with Inductor's on-disk cache warm.
DEFAULT_RATIO = 0.65
DEFAULT_COLD_S = 60.0
DEFAULT_WARM_S = 15.0
_lock = threading.Lock()
FAILED: dict[str, str] = {}  # graph key -> why compiling it failed in this process (not tried again)


def remember_failure(key: str, exc: Exception) -> str:
    """Compiling graph `key` failed: this process does not try it again. Returns the reason as reported."""
    FAILED[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return FAILED[key]


def _number(value, default: float) -> float:
    """A recorded figure, or the default when the record holds something else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else default


def compile_folder() -> Path:
    """Records and Inductor's graphs; FLASHBACK_COMPILE_CACHE moves them (to time a cold start, say)."""
    return Path(os.environ.get("FLASHBACK_COMPILE_CACHE") or cache_root() / "compile")


def use_inductor_cache() -> None:
    """Keep Inductor's compiled graphs under FlashBack's cache folder, unless the user chose a place or that folder
    cannot be written (then Inductor keeps its own default)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    folder = compile_folder() / "inductor"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if os.access(folder, os.W_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def inductor_folder() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or compile_folder() / "inductor")


class Records:
    """What earlier compiled runs measured, per graph: compile seconds (cold, warm) and compiled/eager ratio."""

    def __init__(self, path: Path | None = None):
        self.path = path or compile_folder() / "records.json"

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict:
        entry = self.read().get(key)
        return entry if isinstance(entry, dict) else {}

    def update(self, key: str, **values) -> None:
        with _lock:
            data = self.read()
            data[key] = {**(data.get(key) if isinstance(data.get(key), dict) else {}), **values}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)
            except OSError:  # a read-only cache folder: choices fall back on the defaults
                pass


class AutoCompile:
    """The choice for one session: watch its first eager decode steps, then compile or not, once.

    `decoder` builds (or returns) the compiled step for the session's adapter; `compiled()` says whether this
    process has compiled the graph for `capacity` by now.
    """

    def __init__(
        self,
        key: str,
        capacity: int,
        decode_tokens: int,
        decoder,
        compiled,
        records: Records,
        later: int = 0,
        busy=lambda: False,
    ):
        self.key, self.capacity, self.decode_tokens = key, capacity, decode_tokens
        self.later = later  # tokens that later generations of this process will decode on the same graph (bench)
        self._decoder, self._compiled = decoder, compiled
        self._busy = busy  # the engine's warm-up thread is compiling: wait for it eager (one compile at a time)
        self.in_process = False
        self.records = records
        self.eager_s: list[float] = []
        self.compiled_s: list[float] = []
        self.choice: dict | None = None  # what was chosen and why, once chosen
        self.compile_s = 0.0

    def observe_eager(self, seconds: float):
        """Time of one eager decode step; returns the compiled decoder when the choice is to switch to it."""
        self.eager_s.append(seconds)
        if self.choice is not None or len(self.eager_s) < EAGER_STEPS:
            return None
        eager = statistics.median(self.eager_s)
        if self.key in FAILED:
            self.choice = {"compiled": False, "reason": f"compiling this graph failed earlier: {FAILED[self.key]}"}
            return None
        if self._busy():
            self.choice = {"compiled": False, "reason": "the server is compiling this graph in the background"}
            return None
        past = self.records.get(self.key)
        ratio = min(1.0, _number(past.get("ratio"), DEFAULT_RATIO))
        self.in_process = self._compiled()
        if self.in_process:
            cost, source = 0.0, "compiled earlier in this process"
        elif past.get("cold_s") is not None and inductor_folder().is_dir():
            cost, source = _number(past.get("warm_s"), DEFAULT_WARM_S), "warm: Inductor's cache has seen this graph"
        else:
            cost, source = _number(past.get("cold_s"), DEFAULT_COLD_S), "cold: first compile of this graph here"
        remaining = max(0, self.decode_tokens - len(self.eager_s)) + self.later
        saving = remaining * eager * (1 - ratio)
        compile = saving > cost
        later = f" ({self.later} in later runs)" if self.later else ""
        self.choice = {
            "compiled": compile,
            "reason": (
                f"{remaining} tokens to decode{later} x {1000 * eager:.1f} ms eager x {1 - ratio:.0%} saved = "
                f"{saving:.1f} s {'>' if compile else '<='} {cost:.1f} s to compile ({source})"
            ),
            "eager_ms": round(1000 * eager, 3),
            "expected_ratio": ratio,
            "expected_compile_s": cost,
            "remaining_tokens": remaining,
            "later_tokens": self.later,
            "warm": source.startswith("warm") or self.in_process,
        }
        if not compile:
            return None
        try:
            return self._decoder()
        except Exception as exc:  # noqa: BLE001 - building the step failed: stay eager
            self.failed(exc)
            return None

    def failed(self, exc: Exception) -> None:
        """The compiled step raised: the session goes on eager, and this process does not try the graph again."""
        reason = remember_failure(self.key, exc)
        if self.choice is not None:
            self.choice.update(compiled=False, failed=reason)

    def compiled_step(self, seconds: float, compile_s: float) -> None:
        """One step through the compiled decoder; `compile_s` > 0 on the step that compiled."""
        if compile_s > 0:
            self.compile_s += compile_s
            if not self.in_process:
                self.records.update(self.key, **{("warm_s" if self.choice["warm"] else "cold_s"): round(compile_s, 2)})
            self.in_process = True
        else:
            self.compiled_s.append(seconds)

    def finish(self) -> None:
        """The session ends: keep the measured compiled/eager ratio for the next choices."""
        if self.choice is None or not self.choice["compiled"]:
            return
        self.choice["compile_s"] = round(self.compile_s, 3)
        if len(self.compiled_s) >= EAGER_STEPS:
            compiled = statistics.median(self.compiled_s)
            self.choice["compiled_ms"] = round(1000 * compiled, 3)
            self.records.update(self.key, ratio=round(compiled / statistics.median(self.eager_s), 4))


def remember_compile(key: str, seconds: float) -> None:
    """A compile that auto did not choose (--compile on): record its time, so that auto knows Inductor's cache has
    seen this graph. The first one recorded counts as cold, later ones as warm; a first compile here that found the
    graph in Inductor's cache already is thus recorded as cold, which errs towards compiling."""
    records = Records()
    field = "warm_s" if records.get(key).get("cold_s") is not None else "cold_s"
    records.update(key, **{field: round(seconds, 2)})


def graph_key(name: str, adapter: str | None, capacity: int, device: torch.device, dtype: str) -> str:
    """One compiled graph: the model, the adapter merged into it, the cache shape, where it runs."""
    return f"{name}|{adapter or '-'}|{capacity}|{device.type}|{dtype}|torch {torch.__version__}"
