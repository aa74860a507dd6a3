"""The KV cache with three explicit verbs: extend, rollback, reset.

This is the only module that touches the transformers Cache; `KVCache` is the PyTorch engine's Session.
FlashBack's whole speed-up rests on `rollback`: a passage appended after the context can be dropped by
cropping the cache, leaving exactly the keys and values a plain forward over the context would have produced.
Positions of new tokens follow the cache length, so after a rollback the next tokens take the
positions the dropped ones had.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from flashback.engines.base import Forward, Session, forward_kind
from flashback.errors import FlashbackError

ROLLBACK_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # what new_cache replaces with its own layers


class GrowableLayer(DynamicLayer):
    """A DynamicLayer that writes into preallocated buffers instead of concatenating.

    DynamicLayer appends with torch.cat, which copies the whole cache at every decoded token (about
    a quarter of a decode step at 2k tokens on CPU for SmolLM2). Here capacity doubles when full, new
    states are written in place, and `keys` / `values` are views of the filled part, so a crop is
    just a shorter view.
    """

    min_capacity = 256

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if needed <= capacity:
            return
        size = max(needed, 2 * capacity, self.min_capacity)
        k = like_k.new_empty((*like_k.shape[:-2], size, like_k.shape[-1]))
        v = like_v.new_empty((*like_v.shape[:-2], size, like_v.shape[-1]))
        if self._len:
            k[..., : self._len, :] = self._k[..., : self._len, :]
            v[..., : self._len, :] = self._v[..., : self._len, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self._len + n, key_states, value_states)
        self._k[..., self._len : self._len + n, :] = key_states
        self._v[..., self._len : self._len + n, :] = value_states
        self._set_length(self._len + n)
        return self.keys, self.values

    def _set_length(self, length: int) -> None:
        """`keys` / `values` become views of the first `length` buffered positions."""
        self._len = length
        self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._set_length(max(0, self._len + tokens_to_remove))

    def reset(self) -> None:
        self._k = self._v = None
        self._len = 0
        super().reset()


class Windowed:
    """What both sliding-window layers share: they hold the keys from absolute position `start` on, and drop those
    no later query can see.

    A query at position q sees keys q - window + 1 .. q. The session says how far back a later rollback can go
    (`floor`); every later query then sits at or after min(floor, length), so keys before that minus
    `window - 1` are never read again. Positions stay absolute: `get_seq_length` counts the dropped keys, and
    `get_mask_sizes` tells transformers' mask builder that the held keys start at `start`, where it applies the
    window as it does for its own sliding layer.
    """

    is_sliding = True

    def _init_window(self, window: int) -> None:
        self.window = window
        self.floor = 0  # no later rollback goes below this position
        self.start = 0  # absolute position of the first held key

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.start = 0

    def get_seq_length(self) -> int:
        return self.start + self._len if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self._len if self.is_initialized else 0) + query_length, self.start

    def droppable(self) -> int:
        """Held keys that no later query can see."""
        first_query = min(self.floor, self.get_seq_length())
        return max(0, first_query - self.window + 1 - self.start)

    def _drop(self, drop: int, size: int | None = None) -> None:
        """Move the held keys after the first `drop` to the front of the buffer (a new one of `size` slots, if
        given)."""
        kept = self._len - drop
        if size is not None:
            old_k, old_v = self._k, self._v
            self._k, self._v = (b.new_zeros((*b.shape[:-2], size, b.shape[-1])) for b in (old_k, old_v))
            self._k[..., :kept, :], self._v[..., :kept, :] = (
                old_k[..., drop : self._len, :],
                old_v[..., drop : self._len, :],
            )
        else:
            for buffer in (self._k, self._v):
                source = buffer[..., drop : self._len, :]
                buffer[..., :kept, :] = source if drop >= kept else source.clone()
        self.start += drop
        self._set_length(kept)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        length = max(0, self.get_seq_length() + tokens_to_remove)
        if not self.reaches(length):
            raise FlashbackError(
                f"cannot roll back to {length} tokens: this sliding-window layer dropped the keys before position "
                f"{self.start} (a rollback may not go below the session's floor, {self.floor})"
            )
        self._set_length(length - self.start)
        self.floor = min(self.floor, length)

    def reaches(self, length: int) -> bool:
        """Whether the held keys serve queries from `length` on (a rollback to `length` stays exact)."""
        return self.start == 0 or self.start <= length - self.window + 1

    def reset(self) -> None:
        super().reset()
        self.start = self.floor = 0


class WindowLayer(Windowed, GrowableLayer):
    """A sliding-window layer that holds its window plus what a rollback may still need, not every key: at most
    `window - 1` keys plus the distance from the floor to the end (for FlashBack: one retrieval step's block and
    the tokens generated since), whatever the sequence's length."""

    min_capacity = 16  # grows to twice what it must hold at most

    def __init__(self, window: int):
        super().__init__()
        self._init_window(window)

    def compact(self, incoming: int) -> None:
        """Drop the keys no later query sees, before a forward of `incoming` tokens (not inside `update`: the
        forward's mask is sized from the held keys before it runs). Done when the move does not overlap (half or
        more is droppable) or when the new keys would not fit, so it costs O(1) per token amortized."""
        drop = self.droppable() if self.is_initialized else 0
        if drop == 0:
            return
        capacity = 0 if self._k is None else self._k.shape[-2]
        kept = self._len - drop
        if drop < kept and self._len + incoming <= capacity:
            return
        shrink = capacity > 4 * max(kept + incoming, self.min_capacity)  # held far more once (a long prefill)
        self._drop(drop, 2 * max(kept + incoming, self.min_capacity) if shrink else None)


class FixedLayer(GrowableLayer):
    """A GrowableLayer with one fixed-size buffer, which the compiled decode step can also write.

    Extends (eager) behave exactly as in GrowableLayer: filled-part views, causal attention over them.
    During a decode step (between start_decode and finish_decode) the layer works like transformers'
    StaticLayer: the token goes in at the tensor `position` and attention sees the whole buffer, masked
    past the filled length, so the step's shapes never change and one compiled graph serves every step.
    Rollback stays a length change; stale entries past the length are masked out.
    """

    is_compileable = True

    def __init__(self, capacity: int, position: torch.Tensor):
        super().__init__()
        self.capacity = capacity
        self.static = False
        self.position = position  # shared by every layer of the cache: all hold the same length

    def _check_room(self, needed: int) -> None:
        if needed > self.capacity:
            raise FlashbackError(f"the KV cache holds {self.capacity} tokens; {needed} were asked for")

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        self._check_room(needed)
        if self._k is None:
            self._k = like_k.new_zeros((*like_k.shape[:-2], self.capacity, like_k.shape[-1]))
            self._v = like_v.new_zeros((*like_v.shape[:-2], self.capacity, like_v.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.static:
            return super().update(key_states, value_states, *args, **kwargs)
        index = self.position.reshape(1)
        self._k.index_copy_(2, index, key_states)
        self._v.index_copy_(2, index, value_states)
        return self._k, self._v

    def start_decode(self) -> None:
        """The next forward writes one token at `position` (set once for all layers by the caller, to the filled
        length), with the whole buffer as its shape."""
        self._check_room(self._len + 1)
        self.static = True

    def finish_decode(self, wrote: bool) -> None:
        """Back to extends; the filled part grows by the token the decode step wrote, if it ran."""
        self.static = False
        if wrote:
            self._set_length(self._len + 1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self._k.shape[-2], 0
        return super().get_mask_sizes(query_length)

    def get_seq_length(self):
        return self.position if self.static else super().get_seq_length()

    def reset(self) -> None:
        super().reset()
        self.static = False


class FixedWindowLayer(Windowed, FixedLayer):
    """A sliding-window layer in a fixed buffer of `slots` (a few hundred more than the window), for the decode step.

    It holds the keys from `start` on, as WindowLayer does; when the next forward would not fit, the keys no later
    query sees are dropped and the rest moved to the front (outside the decode step, so its graph never changes).
    The decode step writes at the tensor `slot` (the length less `start`) and tells the mask builder that the
    buffer's keys start at the tensor `offset`, so one compiled graph serves every position. A session whose floor
    stays far behind (nothing may be dropped) grows the buffer, which compiles one more graph.
    """

    def __init__(self, slots: int, position: torch.Tensor, window: int, limit: int):
        super().__init__(slots, position)
        self._init_window(window)
        self.limit = limit  # the cache's capacity: the most positions the sequence reaches, so never outgrown
        with torch.inference_mode(False):  # the compiled step's inputs, like `position` (see new_cache)
            self.slot = torch.zeros((), dtype=torch.long, device=position.device)
            self.offset = torch.zeros((), dtype=torch.long, device=position.device)

    def _reserve(self, needed: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        if needed > self.capacity:
            self._grow(needed)
        super()._reserve(needed, like_k, like_v)

    def _grow(self, needed: int) -> None:
        self.capacity = min(-(-2 * needed // SLOT_STEP) * SLOT_STEP, max(self.limit, needed))
        if self._k is not None:
            self._drop(0, self.capacity)

    def room(self) -> int:
        """Tokens the next forward may bring in after the droppable keys go."""
        if not self.is_initialized:
            return self.capacity
        return self.capacity - self._len + self.droppable()

    def compact(self, incoming: int) -> None:
        """Make room for `incoming` tokens: drop what no later query sees once the buffer would overflow, and grow
        it if that is not enough."""
        if not self.is_initialized or self._len + incoming <= self.capacity:
            return
        drop = self.droppable()
        if drop:
            self._drop(drop)
        if self._len + incoming > self.capacity:
            self._grow(self._len + incoming)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.static:
            return super().update(key_states, value_states, *args, **kwargs)
        index = self.slot.reshape(1)
        self._k.index_copy_(2, index, key_states)
        self._v.index_copy_(2, index, value_states)
        return self._k, self._v

    def start_decode(self) -> None:
        self.slot.fill_(self._len)
        self.offset.fill_(self.start)
        super().start_decode()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.capacity, self.offset
        return Windowed.get_mask_sizes(self, query_length)

    def get_seq_length(self):
        return self.position if self.static else Windowed.get_seq_length(self)


SLOT_STEP = 256  # FixedWindowLayer buffers are multiples of this (decode.KV_BLOCK: the blocked attention's)
WINDOW_ROOM = 512  # slots a FixedWindowLayer keeps beyond its window: a retrieval step's block and what follows


def window_slots(window: int) -> int:
    return -(-(window + WINDOW_ROOM) // SLOT_STEP) * SLOT_STEP


def new_cache(config, capacity: int | None = None, device: torch.device | None = None) -> DynamicCache:
    """A DynamicCache whose attention layers are GrowableLayers (FixedLayers given a capacity).

    Sliding-window layers (Gemma 2/3, Mistral-style, hybrid local/global models) become WindowLayers, which hold
    the window plus what a rollback may need (the session's floor); in fixed buffers (the decode step),
    FixedWindowLayers of `window_slots` slots, unless `capacity` is no larger (then FixedLayers, which keep every
    key and apply the window in the mask). Layers that hold a recurrent state (linear attention, Mamba) have no
    earlier state to go back to and are refused.
    """
    cache = DynamicCache(config=config)
    unknown = {type(layer).__name__ for layer in cache.layers if type(layer) not in ROLLBACK_LAYERS}
    if unknown:
        raise FlashbackError(
            f"this model's cache layers ({', '.join(sorted(unknown))}) cannot be rolled back: FlashBack needs "
            "attention layers (full or sliding-window)"
        )
    # A normal tensor even when made inside inference mode (a cache moved into fixed buffers mid-generation): the
    # compiled step's guards tell the two kinds apart, and a mismatch would compile the graph again.
    with torch.inference_mode(False):
        position = torch.zeros((), dtype=torch.long, device=device)

    # transformers builds one sliding mask, from the first sliding layer's sizes, for all of them: they may drop keys
    # only if they all drop the same ones (one window), else they keep every key and the mask applies the windows
    windows = {layer.sliding_window for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)}
    window = windows.pop() if len(windows) == 1 else None

    def fixed(layer):
        if isinstance(layer, DynamicSlidingWindowLayer) and window and window_slots(window) < capacity:
            return FixedWindowLayer(window_slots(window), position, window, capacity)
        return FixedLayer(capacity, position)

    def growable(layer):
        if isinstance(layer, DynamicSlidingWindowLayer) and window:
            return WindowLayer(window)
        return GrowableLayer()

    cache.layers = [fixed(layer) if capacity is not None else growable(layer) for layer in cache.layers]
    return cache


PREFILL_CHUNK = 1024  # tokens per forward of a long extend: attention scores stay chunk x length, never L x L
MIN_CHUNK = 64  # a fixed sliding-window buffer with less room than this grows rather than take tiny forwards


class KVCache(Session):
    """Extend, rollback, reset over one sequence's cache.

    With a `decoder` (decode.Decoder), single tokens go through it instead of the eager model; its
    fixed-shape step needs the cache preallocated, so `capacity` (tokens) is then required. With `auto`
    (autocompile.AutoCompile) the cache starts eager and growable, and moves into fixed buffers if the choice is
    to compile. `before_forward` runs before every eager forward (the engine switches the model to this
    sequence's adapter there).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str | None = None,
        capacity: int | None = None,
        decoder=None,
        before_forward: Callable[[], None] | None = None,
        prefixes=None,
        weights_key=None,
        auto=None,
    ):
        if decoder is not None and capacity is None:
            raise ValueError("a decoder needs a fixed cache capacity")
        self.before_forward = before_forward
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.capacity = capacity
        self.decoder = decoder
        self.cache = new_cache(model.config, capacity, self.device)
        self.forwards: list[Forward] = []
        self.ids: list[int] = []  # the tokens cached, in order
        self.eager = 0  # leading cached tokens whose keys and values came from eager forwards (not the decode step)
        self.prefixes = prefixes  # a prefixes.PrefixStore of finished sequences, or None
        self.key = (weights_key, capacity)  # what an entry of the store must match to be reused here
        self.auto = auto

    @property
    def compile_choice(self) -> dict | None:
        return self.auto.choice if self.auto is not None else None

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def extend(
        self, token_ids: Sequence[int] | torch.Tensor, all_logits: bool = False, last_logits: int = 0
    ) -> torch.Tensor:
        """Run `token_ids` after what is cached; return last-position logits (V,), all (T, V), or the last
        `last_logits` positions' (N, V): scoring needs only the target's, and with a large vocabulary the output
        layer is most of a forward's cost."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("extend() needs at least one token")
        before = len(self)
        start = time.perf_counter()
        stepped = self.decoder is not None and ids.shape[1] == 1 and before > 0  # through the decode step
        compiled_before = self.decoder.compile_s if stepped else 0.0
        logits = self._step(int(ids[0, 0]), before) if stepped else None
        if logits is None:
            stepped = False
            if self.before_forward is not None:
                self.before_forward()
            logits = self._forward(ids, ids.shape[1] if all_logits else max(1, last_logits))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        n = ids.shape[1]
        if len(self) != before + n:  # a transformers without the `cache` argument would ignore it silently
            raise FlashbackError(f"the model did not fill the KV cache (transformers {transformers.__version__})")
        if self.eager == before and not stepped:
            self.eager = before + n
        self.ids += ids[0].tolist()
        seconds = time.perf_counter() - start
        self.forwards.append(Forward(forward_kind(before, n), n, len(self), seconds))
        if self.auto is not None and n == 1 and before > 0:
            if stepped:
                self.auto.compiled_step(seconds, self.decoder.compile_s - compiled_before)
            elif (
                self.decoder is None
                and self.fits(self.auto.capacity)
                and (decoder := self.auto.observe_eager(seconds)) is not None
            ):
                self._recast(self.auto.capacity)
                self.decoder, self.capacity = decoder, self.auto.capacity
        return logits if all_logits or last_logits else logits[-1]

    def _forward(self, ids: torch.Tensor, wanted: int) -> torch.Tensor:
        """Eager forwards over `ids` (1, T), PREFILL_CHUNK tokens at a time; the last `wanted` positions' logits
        (wanted, V). A long prompt then never builds a T x T score matrix, and the output layer runs only where
        logits are wanted."""
        n, start, parts = ids.shape[1], 0, []
        while start < n:
            part = ids[:, start : start + self._chunk()]
            self._compact(part.shape[1])
            start += part.shape[1]
            need = min(part.shape[1], wanted - (n - start))  # of this chunk's positions
            out = self.model(input_ids=part, cache=self.cache, use_cache=True, logits_to_keep=max(1, need))
            if need > 0:
                parts.append(out.logits[0, -need:].float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _chunk(self) -> int:
        """Tokens in the next eager forward: PREFILL_CHUNK, or what fits in the fixed sliding-window buffers without
        growing them (they would compile another decode graph), unless that is too few to be worth a forward."""
        rooms = [layer.room() for layer in self._windows() if isinstance(layer, FixedWindowLayer)]
        room = min(rooms, default=PREFILL_CHUNK)
        return min(PREFILL_CHUNK, room) if room >= MIN_CHUNK else PREFILL_CHUNK

    def _windows(self) -> list[Windowed]:
        return [layer for layer in self.cache.layers if isinstance(layer, Windowed)]

    def _compact(self, incoming: int) -> None:
        for layer in self._windows():
            layer.compact(incoming)

    def keep_from(self, floor: int) -> None:
        """No later rollback of this sequence goes below `floor`: sliding-window layers may drop the keys that
        only queries before it could see."""
        for layer in self._windows():
            layer.floor = floor

    def fits(self, capacity: int) -> bool:
        """Whether fixed buffers of `capacity` can take this cache over: a sliding layer that dropped keys needs a
        FixedWindowLayer there (a FixedLayer would need the keys it dropped)."""
        return all(layer.start == 0 or window_slots(layer.window) < capacity for layer in self._windows())

    def reaches(self, length: int) -> bool:
        """Whether a rollback to `length` is possible (sliding-window layers may have dropped what it needs)."""
        return all(layer.reaches(length) for layer in self._windows())

    def _step(self, token: int, length: int) -> torch.Tensor | None:
        """One token through the decode step. Under --compile auto a step that fails (no C++ compiler, an Inductor
        error) leaves the cache as it was and returns None: the session goes on eager, and the process does not
        try that graph again."""
        try:
            return self._decode(token, length)[None]
        except Exception as exc:  # noqa: BLE001 - any compile failure: the eager path still works
            if self.auto is None:
                raise
            self.auto.failed(exc)
            self.decoder = None
            return None

    def _recast(self, capacity: int | None) -> None:
        """The same keys and values in new buffers: fixed ones of `capacity` (for the decode step), or growable."""
        old = self.cache
        self.cache = new_cache(self.model.config, capacity, self.device)
        for layer, before in zip(self.cache.layers, old.layers, strict=True):
            if before.is_initialized and before.keys.shape[-2]:
                windowed = isinstance(before, Windowed) and isinstance(layer, Windowed)
                drop = before.droppable() if windowed else 0  # what no later query reads
                start = getattr(before, "start", 0) + drop
                if start and not isinstance(layer, Windowed):
                    raise FlashbackError("a sliding-window layer that dropped keys cannot move into a full buffer")
                layer.update(before.keys[..., drop:, :], before.values[..., drop:, :])
                if isinstance(layer, Windowed):
                    layer.start, layer.floor = start, getattr(before, "floor", 0)

    def _decode(self, token: int, length: int) -> torch.Tensor:
        self._compact(1)
        layers = self.cache.layers
        layers[0].position.fill_(length)  # one tensor, shared by the layers
        for layer in layers:
            layer.start_decode()
        wrote = False
        try:
            logits = self.decoder(self.cache, token, self.device, self.capacity)
            wrote = True
        finally:
            for layer in layers:
                layer.finish_decode(wrote)
        return logits

    def rollback(self, length: int) -> None:
        """Drop everything after the first `length` cached tokens."""
        drop = len(self) - length
        if drop < 0:
            raise ValueError(f"cannot roll back to {length}: only {len(self)} tokens are cached")
        if drop:  # crop(0) is a no-op, and a positive argument means "keep", so pass -drop
            if not self.reaches(length):  # checked before any layer is cropped, so none is left ragged
                floor = self._windows()[0].floor
                raise FlashbackError(
                    f"cannot roll back to {length} tokens: the sliding-window layers kept only what a rollback to "
                    f"{floor} or later needs"
                )
            self.cache.crop(-drop)  # each WindowLayer lowers its floor to `length`
            del self.ids[length:]
            self.eager = min(self.eager, length)

    def reset(self) -> None:
        self.cache = new_cache(self.model.config, self.capacity, self.device)
        self.ids, self.eager = [], 0

    def start_from(self, tokens: Sequence[int]) -> int:
        """A fresh cache, or the store's finished sequence sharing the longest prefix with `tokens`, rolled back to
        that prefix (whose keys and values are exactly what a fresh forward would compute)."""
        if self.prefixes is None or len(self):
            self.reset()
            return 0
        fed = 2 if self.decoder is not None else 1  # one token left would go through the decode step: keep it eager
        entry, length = self.prefixes.take(self.key, tokens, fed)
        if entry is None:
            return 0
        self.cache, self.ids, self.eager = entry.cache, entry.tokens, len(entry.tokens)
        if not self.reaches(length):  # the sliding-window layers no longer hold what the shared prefix needs
            self.reset()
            return 0
        self.rollback(length)
        return length

    def release(self, keep: int) -> None:
        """Give the first `keep` cached tokens to the store (this session's cache goes with them); only tokens an
        eager forward computed, since the decode step's keys and values (compiled, int8) are not bit-identical to
        a fresh prefill's, and only from a cache every layer of which holds its `ids` (a forward that failed
        halfway leaves it ragged)."""
        if self.auto is not None:
            self.auto.finish()
        if self.prefixes is None:
            return
        layers = [layer for layer in self.cache.layers if getattr(layer, "_k", None) is not None]
        keep = min(keep, self.eager)
        held = [getattr(layer, "_len", 0) + getattr(layer, "start", 0) for layer in self.cache.layers]
        if keep <= 0 or not layers or any(n != len(self.ids) for n in held) or not self.reaches(keep):
            return
        self.rollback(keep)
        if self.auto is not None and self.capacity is not None:  # moved for the decode step: back to what an auto
            self._recast(None)  # session starts from, so that the store's entry serves the next one
        held = [layer._k for layer in self.cache.layers if getattr(layer, "_k", None) is not None]
        nbytes = sum(2 * k.numel() * k.element_size() for k in held)
        self.prefixes.put(self.key, self.ids, self.cache, nbytes)
        self.cache, self.ids = new_cache(self.model.config, self.capacity, self.device), []

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values), each (B, heads, T, head_dim); for checks and tests."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]
