"""Sentence embedding with a transformers encoder (default: the packaged all-MiniLM-L6-v2)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the model's threads need the cores

import numpy as np

from ..config import ModelConfig
from ..errors import FatalBackendError
from .base import Backend, pick_device
from .model_files import resolve_model_path  # noqa: F401  (re-exported: tests and benchmarks import it here)

# A token covers at most this many characters in practice; longer texts are cut (at a space)
# before tokenizing so that a 1 MB body costs no more than a max-length one.
_CHARS_PER_TOKEN_BOUND = 24


def sentence_transformers_pooling(path: Path) -> tuple[str, bool]:
    """Pooling mode and whether to L2-normalize, as the model's sentence-transformers files say."""
    pooling, normalize = "mean", False
    modules = path / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            if kind.endswith("Pooling"):
                conf = json.loads((path / module["path"] / "config.json").read_text())
                pooling = "cls" if conf.get("pooling_mode_cls_token") else "mean"
    return pooling, normalize


class EmbedBackend(Backend):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoConfig, AutoTokenizer

        self.path = resolve_model_path(cfg.path)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"model.path: no config.json in {self.path}")
        model_conf = AutoConfig.from_pretrained(self.path)
        self.dim = model_conf.hidden_size
        self.vocab_size = model_conf.vocab_size
        self.max_length = min(cfg.max_length, getattr(model_conf, "max_position_embeddings", cfg.max_length))
        pooling, normalize = sentence_transformers_pooling(self.path)
        self.pooling = pooling if cfg.pooling == "auto" else cfg.pooling
        self.normalize = normalize if cfg.normalize is None else cfg.normalize
        # The Rust tokenizer, configured once here and never mutated again: it is only ever used on
        # the event-loop thread, so "Already borrowed" (concurrent use from two threads) cannot occur.
        self._tok = AutoTokenizer.from_pretrained(self.path).backend_tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self._trail = _trailing_specials(self._tok.encode("a").special_tokens_mask)  # [SEP] for BERT
        self.model = None
        self.device = None

    # ---- event-loop thread -------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], truncate: bool) -> list[np.ndarray]:
        limit = self.max_length * _CHARS_PER_TOKEN_BOUND
        cut = [_cut_at_space(t, limit) if len(t) > limit else t for t in texts]
        encodings = self._tok.encode_batch(cut) if len(cut) > 1 else [self._tok.encode(cut[0])]
        out = []
        for i, enc in enumerate(encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if cut[i] is not texts[i] and len(ids) <= self.max_length:
                ids = np.asarray(self._tok.encode(texts[i]).ids, dtype=np.int64)  # rare: huge words
            param = f"input[{i}]" if len(texts) > 1 else "input"
            out.append(self._fit(ids, truncate, param, self._trail))
        return out

    # ---- model thread ------------------------------------------------------------------------
    def load(self) -> None:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = pick_device(self.cfg)
        dtype = getattr(torch, self.cfg.dtype)
        self.model = AutoModel.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        # Warm up on the longest bucket so the first request does not pay for allocator growth.
        warm = np.full(self.max_length, 1000, dtype=np.int64)
        self.embed([warm, warm[: self.max_length // 4]])

    def embed(self, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        import torch

        try:
            return self._forward(batch)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()  # give the bisected retry the memory back
            raise
        except RuntimeError as exc:
            if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                raise FatalBackendError(str(exc)) from exc  # the CUDA context is unusable from here on
            raise

    def _forward(self, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        import torch

        ids_np, mask_np = self.pad_batch(batch, self.pad_id)
        ids = torch.from_numpy(ids_np).to(self.device, non_blocking=True)
        mask = torch.from_numpy(mask_np).to(self.device, non_blocking=True)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors = pooled.cpu().numpy()
        return vectors, ids_np.size


def _trailing_specials(mask: list[int]) -> int:
    n = 0
    while n < len(mask) and mask[len(mask) - 1 - n]:
        n += 1
    return n


def _cut_at_space(text: str, limit: int) -> str:
    space = text.rfind(" ", limit // 2, limit)
    return text[: space if space > 0 else limit]
