"""A deterministic backend without a model, for scheduler tests and overhead benchmarks.

Words map to ids by crc32; the vector depends only on the real ids (never on padding or batch
company), so any mis-routing of results shows. Knobs: a sleep per batch and per padded token, and
magic words that make the batch raise (`__poison__`), run out of memory (`__oom__` in a batch of
more than one), or kill the device (`__fatal__`). It counts everything the model "ran".
"""
from __future__ import annotations

import threading
import time
import zlib
from typing import Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import FatalBackendError
from .base import Backend

BOS, EOS, POISON, OOM, FATAL, PROBE = 1, 2, 3, 4, 5, 6  # words map to ids >= 10
_MAGIC = {"__poison__": POISON, "__oom__": OOM, "__fatal__": FATAL}


class FakeBackend(Backend):
    vocab_size = 30000
    calibration_token_id = PROBE  # start-up timing batches: not counted in `seen`

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.dim = cfg.fake_dim
        # a fixed random vector per token id: a vector is the masked sum of its tokens' rows, so it
        # depends on the real ids only, and costs a gather, not maths (the fake must stay cheap)
        self._table = np.random.default_rng(0).standard_normal((self.vocab_size, self.dim)).astype(np.float32)
        self.seen: list[tuple[int, ...]] = []  # every input that reached the "model", in order
        self.batch_sizes: list[int] = []
        self.model_thread: threading.Thread | None = None

    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[np.ndarray]:
        out = []
        for i, text in enumerate(texts):
            words = [_MAGIC.get(w) or 10 + zlib.crc32(w.encode()) % (self.vocab_size - 10) for w in text.split()]
            ids = np.asarray([BOS, *words, EOS], dtype=np.int64)
            out.append(self._fit(ids, truncate, f"input[{i}]" if len(texts) > 1 else "input", trail=1))
        return out

    def load(self) -> None:
        self.model_thread = threading.current_thread()

    def embed(self, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        assert threading.current_thread() is self.model_thread, "the model ran off the model thread"
        ids, mask = self.pad_batch(batch, 0)
        if (ids == FATAL).any():
            raise FatalBackendError("device lost")
        if (ids == POISON).any():
            raise ValueError("poisoned input")
        if len(batch) > 1 and (ids == OOM).any():
            raise MemoryError("out of memory")
        delay = self.cfg.fake_batch_ms / 1e3 + self.cfg.fake_token_us / 1e6 * ids.size
        if delay:
            time.sleep(delay)
        if not (ids == PROBE).any():
            self.seen.extend(tuple(row.tolist()) for row in batch)
            self.batch_sizes.append(len(batch))
        vectors = np.einsum("bt,btd->bd", mask.astype(np.float32), self._table[ids])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, ids.size


class FakeGenerateBackend:
    """A deterministic generation model without a model, for scheduler tests and Ray/ops tests:
    the next token depends only on the previous token and its position; words are `w<id>`; a step
    sleeps `fake_batch_ms` (an accelerator's step time). Same surface as backends.generate."""

    vocab_size = 1000
    eos_ids = {EOS}

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.max_length = cfg.max_length
        self.slots = cfg.generation.max_running_seqs
        self._running: set[int] = set()

    @property
    def kv_capacity(self) -> int:
        return self.slots * self.max_length

    def tokenize_chat(self, messages: list[dict]) -> np.ndarray:
        return self.tokenize_prompt(" ".join(str(m.get("content", "")) for m in messages))

    def tokenize_prompt(self, text: str) -> np.ndarray:
        return np.asarray([BOS, *(10 + zlib.crc32(w.encode()) % (self.vocab_size - 10) for w in text.split())],
                          dtype=np.int64)

    def decode_text(self, ids: Sequence[int]) -> str:
        return "".join(f" w{i}" for i in ids if i >= 10)

    def is_oom(self, exc: BaseException) -> bool:
        return False

    def load(self) -> None:
        pass

    def step(self, work):
        from .generate import StepOutput

        started = time.monotonic()
        self._running.difference_update(work.free)
        self._running.update(seq for seq, _ in work.admit)
        assert len(self._running) <= self.slots, "more running sequences than KV slots"
        if work.prefill or work.decode:
            time.sleep(self.cfg.fake_batch_ms / 1e3)
        tokens = {seq: _next_token(int(ids[-1]), start + len(ids), suppress)
                  for seq, ids, start, last, suppress in work.prefill if last}
        tokens.update({seq: _next_token(tok, pos + 1, suppress) for seq, tok, pos, suppress in work.decode})
        return StepOutput(tokens, started, time.monotonic() - started)


def _next_token(last: int, position: int, suppress_eos: bool) -> int:
    token = 10 + (last * 7919 + position * 31) % 990
    return EOS if token % 97 == 0 and not suppress_eos else token
