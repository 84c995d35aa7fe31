"""The backend contract.

Today's only task is embedding: `embed` maps one batch of token-id arrays to one vector each. The
engine never assumes more than "the model thread turns a list of inputs into a list of outputs", so a
generation backend can later run one decode step per call and return partial outputs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import FatalBackendError, InvalidRequest


def pick_device(cfg: ModelConfig):
    """The torch device `model.device` names ("auto": CUDA when there is one). Model thread."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise FatalBackendError("model.device is 'cuda' but no CUDA device is available")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    return torch.device(device)


class Backend(ABC):
    name: str
    calibration_token_id = 1000  # an ordinary token, for timing batches at start-up
    dim: int
    max_length: int
    vocab_size: int

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.max_length = cfg.max_length

    # ---- event-loop thread -------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[np.ndarray]:
        """Token ids (special tokens included) per text; too long -> InvalidRequest unless truncate."""

    def check_token_ids(self, rows: Sequence[Sequence[int]], truncate: bool) -> list[np.ndarray]:
        """Validate caller-made token ids: non-empty, inside the vocabulary, not over max_length."""
        out = []
        for i, row in enumerate(rows):
            param = f"input[{i}]" if len(rows) > 1 else "input"
            if len(row) == 0:
                raise InvalidRequest("token list must not be empty", param=param)
            if min(row) < 0 or max(row) >= self.vocab_size:  # before numpy: huge ints overflow int64
                raise InvalidRequest(f"token ids must be within 0..{self.vocab_size - 1}", param=param)
            arr = np.asarray(row, dtype=np.int64)
            out.append(self._fit(arr, truncate, param))
        return out

    def _fit(self, ids: np.ndarray, truncate: bool, param: str, trail: int = 0) -> np.ndarray:
        """Refuse or truncate an over-long input, keeping its `trail` closing special tokens."""
        if len(ids) <= self.max_length:
            return ids
        if not truncate:
            raise InvalidRequest(
                f"input has {len(ids)} tokens, more than the model's maximum of {self.max_length}; "
                "shorten it or send \"truncate\": true",
                param=param, code="context_length_exceeded")
        keep = self.max_length - trail
        return np.concatenate([ids[:keep], ids[len(ids) - trail:]]) if trail else ids[:keep]

    # ---- model thread ------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Load weights and warm up. Runs on the model thread."""

    @abstractmethod
    def embed(self, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        """One forward pass: float32 [len(batch), dim] and the padded token count it cost."""

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"

    def pad_batch(self, batch: Sequence[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest input of this batch (not the bucket): input ids and mask."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask
