"""A model of a continuous-batching engine (vLLM V1-like) on one device, in virtual steps.

One loop runs steps while any sequence runs. A step takes

    (decode_ms + step_ms_per_seq x sequences in the batch
     + prefill tokens in this step / prefill_tokens_per_second) x time_scale

and gives every decoding sequence one token; a sequence whose prefill ends in the step gives
its first token at the end of it. Prefill is chunked: a step takes at most
``max_batched_tokens`` prompt tokens (0: no limit), first come first served. At most
``max_batch`` sequences run (0: no limit) and, when the KV pool has a size
(``prefix_cache_blocks``), a sequence is admitted only while the blocks it reserves (prompt +
answer) fit; the rest wait in order, as vLLM's scheduler keeps them.

The prefix cache is an LRU of ``block_tokens``-token blocks identified by a chain hash (each
block's hash covers every token before it, as vLLM's does), holding at most
``prefix_cache_blocks``. A prompt's leading blocks found there are not prefilled again (the
last token always is, as in vLLM). Tokens are whitespace-separated words (generate.py).

Pure asyncio, no I/O: the server turns a :class:`Seq`'s tokens into SSE chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sim.settings import SimSettings

# A step never starts further behind its schedule than this: on a busy machine the loop's
# clock may slip; catching up in a burst would make every later token look early.
MAX_LAG_S = 0.05


def block_hashes(words: list[str], block_tokens: int) -> list[int]:
    """Chain hashes of the full ``block_tokens``-word blocks of ``words``."""
    out: list[int] = []
    h = 0
    for i in range(len(words) // block_tokens):
        h = hash((h, *words[i * block_tokens:(i + 1) * block_tokens]))
        out.append(h)
    return out


@dataclass(eq=False)
class Seq:
    """One request in the engine: its prompt, its answer's length and the tokens produced."""

    model: str
    prompt_tokens: int
    out_tokens: int
    blocks: list[int]
    prefill_left: int = 0
    produced: int = 0
    reserved: int = 0  # KV blocks held while running
    hit_tokens: int = 0
    done: bool = False
    _ready: asyncio.Queue[int] = field(default_factory=asyncio.Queue)

    async def next_token(self) -> int:
        """Wait for the next token; returns how many tokens exist so far."""
        return await self._ready.get()


class Engine:
    """The batch, the queue and the prefix cache of one simulated device."""

    def __init__(self, settings: Callable[[], SimSettings]) -> None:
        self._settings = settings
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.kv_used = 0
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0     # of which found
        self.steps = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- requests ----------------------------------------------------------------------------

    def submit(self, model: str, prompt: str, out_tokens: int) -> Seq:
        """Queue a sequence; its tokens come through :meth:`Seq.next_token`."""
        s = self._settings()
        words = prompt.split()
        seq = Seq(model=model, prompt_tokens=max(1, len(words)), out_tokens=max(1, out_tokens),
                  blocks=block_hashes(words, s.block_tokens) if s.prefix_cache_blocks else [])
        self.waiting.append(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                name="sim-engine")
        self._wake.set()
        return seq

    def cancel(self, seq: Seq) -> None:
        """Take ``seq`` out (finished, or its client left), freeing what it held."""
        if seq.done:
            return
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used -= seq.reserved
            self._wake.set()  # room for a waiting one
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- figures -----------------------------------------------------------------------------

    def kv_usage(self) -> float:
        """Share of the KV pool held by running sequences (0 when the pool has no size)."""
        capacity = self._settings().prefix_cache_blocks
        return min(1.0, self.kv_used / capacity) if capacity else 0.0

    def count(self, model: str) -> tuple[int, int]:
        """(running, waiting) sequences of ``model``."""
        return (sum(1 for q in self.running if q.model == model),
                sum(1 for q in self.waiting if q.model == model))

    def reset_cache(self) -> None:
        self.cache.clear()

    # -- the loop ----------------------------------------------------------------------------

    def _admit(self, s: SimSettings) -> None:
        capacity = s.prefix_cache_blocks
        while self.waiting and (not s.max_batch or len(self.running) < s.max_batch):
            seq = self.waiting[0]
            need = math.ceil((seq.prompt_tokens + seq.out_tokens) / s.block_tokens)
            # Head of line waits for room, unless nothing runs (an oversized one must not
            # block the engine for ever).
            if capacity and self.running and self.kv_used + need > capacity:
                break
            self.waiting.popleft()
            hit = 0
            for h in seq.blocks:
                if h not in self.cache:
                    break
                self.cache.move_to_end(h)
                hit += 1
            seq.hit_tokens = min(hit * s.block_tokens, seq.prompt_tokens - 1)
            self.queries += seq.prompt_tokens
            self.hits += seq.hit_tokens
            seq.prefill_left = seq.prompt_tokens - seq.hit_tokens
            seq.reserved = need
            self.kv_used += need
            self.running.append(seq)

    def _cache(self, seq: Seq, s: SimSettings) -> None:
        for h in seq.blocks:
            self.cache[h] = None
            self.cache.move_to_end(h)
        while len(self.cache) > s.prefix_cache_blocks:
            self.cache.popitem(last=False)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            s = self._settings()
            self._admit(s)
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
                continue
            budget = s.max_batched_tokens or math.inf
            prefill = 0
            batch: list[tuple[Seq, bool]] = []  # (sequence, gives a token this step)
            for seq in self.running:
                if seq.prefill_left > 0:
                    take = int(min(seq.prefill_left, budget - prefill))
                    if take <= 0:
                        continue
                    prefill += take
                    seq.prefill_left -= take
                    batch.append((seq, seq.prefill_left == 0))
                else:
                    batch.append((seq, True))
            step = s.decode_ms / 1000 + s.step_ms_per_seq / 1000 * len(batch)
            if s.prefill_tokens_per_second > 0:
                step += prefill / s.prefill_tokens_per_second
            due = max(due + step * s.time_scale, loop.time() - MAX_LAG_S)
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.steps += 1
            for seq, gives in batch:
                if seq.done:
                    continue  # cancelled during the step
                if not gives:
                    continue
                if seq.produced == 0 and seq.blocks:
                    self._cache(seq, s)
                seq.produced += 1
                seq._ready.put_nowait(seq.produced)
                if seq.produced >= seq.out_tokens:
                    self.cancel(seq)
