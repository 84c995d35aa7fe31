"""Text generation with a transformers Llama-family causal LM (default: the packaged SmolLM2-135M-Instruct)
and a preallocated slot KV cache.

KV layout: per layer one K and one V tensor of [slots + 1, kv_heads, max_length, head_dim], allocated
once at load (memory = max_running_seqs x max_length tokens, bounded by config, never sized from the
machine). A sequence owns one slot from admission to retirement: joining or leaving copies nothing
(a DynamicCache-style batch cache is re-concatenated on every join and leave). A step attends over
the slots of its rows up to the longest row; the last slot is scratch space for padding rows.

The model's own weights and modules run the maths (embeddings, norms, projections, rotary, MLP);
this file only does attention against the slot cache, so the output equals `generate()`.
Everything here runs on the model thread except `tokenize_*`, `decode_text` (event-loop thread).
"""
from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

from ..config import ModelConfig
from ..errors import InvalidRequest
from .base import pick_device
from .model_files import resolve_model_path


@dataclass(slots=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(slots=True)
class ThreadStep:
    """What the model thread does in one step (built on the loop from a planner StepPlan)."""
    free: list[int] = field(default_factory=list)
    admit: list[tuple[int, Sampling]] = field(default_factory=list)
    # (sequence id, prompt token ids of this chunk, start position, last chunk?, suppress eos?)
    prefill: list[tuple[int, np.ndarray, int, bool, bool]] = field(default_factory=list)
    # (sequence id, its last token, that token's position, suppress eos?)
    decode: list[tuple[int, int, int, bool]] = field(default_factory=list)


@dataclass(slots=True)
class StepOutput:
    tokens: dict[int, int]  # sequence id -> next token (for decodes and finished prefills)
    started: float  # time.monotonic() when the model thread took the step
    model_s: float


class GenerateBackend:
    calibration_token_id = 1000

    def __init__(self, cfg: ModelConfig, model=None, tokenizer=None) -> None:
        """`model` and `tokenizer` may be given (tests build a tiny random Llama); otherwise they load
        from `cfg.path` (the tokenizer here, the model on the model thread in `load`)."""
        self.cfg = cfg
        self.name = cfg.name
        self.max_length = cfg.max_length
        self.slots = cfg.generation.max_running_seqs
        self.model = model
        self.tokenizer = tokenizer
        if model is None:
            from transformers import AutoConfig, AutoTokenizer

            self.path = resolve_model_path(cfg.path)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            conf = AutoConfig.from_pretrained(self.path)
        else:
            conf = model.config
        self.vocab_size = conf.vocab_size
        self.max_length = min(cfg.max_length, getattr(conf, "max_position_embeddings", cfg.max_length))
        eos = conf.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._rust = self.tokenizer.backend_tokenizer if self.tokenizer is not None else None
        self._state: dict[int, tuple[int, object, Sampling]] = {}  # sequence -> (slot, its Generator, sampling)
        self._free_slots: list[int] = list(range(self.slots))

    # ---- event-loop thread -------------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict]) -> np.ndarray:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template: use /v1/completions", param="messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template that refuses these messages (roles, order): the client's input
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", param="messages") from None
        if hasattr(ids, "keys"):  # transformers 5 answers a BatchEncoding
            ids = ids["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def tokenize_prompt(self, text: str) -> np.ndarray:
        if self._rust is None:
            raise InvalidRequest("this model takes token ids only", param="prompt")
        return np.asarray(self._rust.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode_text(self, ids: Sequence[int]) -> str:
        if self._rust is None:
            return "".join(f" {i}" for i in ids)  # tests with a tokenizer-less model read token ids
        return self._rust.decode(list(ids), skip_special_tokens=True)

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"

    # ---- model thread ------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        self.device = pick_device(self.cfg)
        # torch's intra-op thread count is per calling thread, so this model thread sets its own per
        # forward (0.3 us) and the embedding model's thread keeps its own. A prefill is a few large
        # matmuls: all cores (4x128 tokens: 1064 ms with 2 threads, 2035 ms with 1). A decode is
        # hundreds of small ops, each waiting for every intra-op thread, so one thread the OS parks
        # for the event loop stalls them all: all cores but one (B=16, 2 cores: 245 ms with 2 threads,
        # 217 ms with 1; beside one busy process 987 ms with 2, 230 ms with 1).
        cores = len(os.sched_getaffinity(0))
        self.prefill_threads = self.cfg.torch_threads or cores
        self.decode_threads = self.cfg.torch_threads or max(1, cores - 1)
        dtype = getattr(torch, self.cfg.dtype)
        if self.model is None:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        self.model = self.model.to(self.device, dtype=dtype).eval()
        conf = self.model.config
        self.heads = conf.num_attention_heads
        self.kv_heads = getattr(conf, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // self.heads
        shape = (self.slots + 1, self.kv_heads, self.max_length, self.head_dim)  # +1: scratch slot
        layers = conf.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.kv_bytes = 2 * layers * int(np.prod(shape)) * self.k_cache[0].element_size()
        # warm-up: one prefill and a few decodes, so the first request does not pay for allocator growth
        self.step(ThreadStep(admit=[(-1, Sampling())],
                             prefill=[(-1, np.full(16, self.calibration_token_id % self.vocab_size), 0, True, False)]))
        self.step(ThreadStep(free=[-1]))

    @property
    def kv_capacity(self) -> int:
        return self.slots * self.max_length

    def step(self, work: ThreadStep) -> StepOutput:
        import torch

        started = time.monotonic()
        t0 = time.perf_counter()
        for seq in work.free:
            slot = self._state.pop(seq)[0]
            heapq.heappush(self._free_slots, slot)
        for seq, sampling in work.admit:
            gen = None
            if sampling.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
            self._state[seq] = (heapq.heappop(self._free_slots), gen, sampling)
        tokens: dict[int, int] = {}
        with torch.inference_mode():
            if work.prefill:  # prompts and decodes run apart: a decode row padded to a chunk's width is waste
                torch.set_num_threads(self.prefill_threads)
                self._run_rows(work.prefill, tokens)
            if work.decode:
                torch.set_num_threads(self.decode_threads)
                self._run_rows([(seq, np.asarray([tok]), pos, True, suppress)
                                for seq, tok, pos, suppress in work.decode], tokens)
        return StepOutput(tokens, started, time.perf_counter() - t0)

    def _run_rows(self, rows, tokens: dict[int, int]) -> None:
        """One forward over rows of (seq, ids, start, wants a token, suppress eos): each row's ids
        go to positions start.. of its own slot; rows that want a token sample from their last one."""
        import torch

        n = len(rows)
        width = max(len(ids) for _, ids, _, _, _ in rows)
        scratch = self.slots
        ids = np.zeros((n, width), dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        slot_idx = np.full((n, width), scratch, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        for r, (seq, chunk, start, _, _) in enumerate(rows):
            k = len(chunk)
            ids[r, :k] = chunk
            pos[r, :k] = np.arange(start, start + k)
            pos[r, k:] = np.arange(width - k)  # padding goes to the scratch slot, any position
            slot_idx[r, :k] = self._state[seq][0]
            lengths[r] = start + k
        kv_len = int(lengths.max())
        dev = self.device
        input_ids = torch.from_numpy(ids).to(dev)
        positions = torch.from_numpy(pos).to(dev)
        write_slots = torch.from_numpy(slot_idx).to(dev)
        row_slots = torch.as_tensor([self._state[seq][0] for seq, *_ in rows], device=dev)
        # key j is visible to the query at position p of the same row when j <= p
        mask = (torch.arange(kv_len, device=dev)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        contiguous = bool((row_slots[1:] - row_slots[:-1] == 1).all()) if n > 1 else True
        lo = int(row_slots[0])
        logits = self._forward(input_ids, positions, write_slots, row_slots, mask, kv_len,
                               slice(lo, lo + n) if contiguous else None,
                               torch.from_numpy(np.array([len(c) - 1 for _, c, _, _, _ in rows])).to(dev))
        for r, (seq, _, _, wants, suppress) in enumerate(rows):
            if wants:
                tokens[seq] = self._sample(seq, logits[r], suppress)

    def _forward(self, input_ids, positions, write_slots, row_slots, mask, kv_len, rows_slice, last):
        import torch
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        body = self.model.model
        n, width = input_ids.shape
        hidden = body.embed_tokens(input_ids)
        cos, sin = body.rotary_emb(hidden, positions)
        for li, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, width, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, width, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, width, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[write_slots, :, positions] = k.transpose(1, 2)  # [n, width, kv_heads, dim] into the slots
            vc[write_slots, :, positions] = v.transpose(1, 2)
            if rows_slice is not None:  # the rows' slots are neighbours: a view, no copy
                keys, values = kc[rows_slice, :, :kv_len], vc[rows_slice, :, :kv_len]
            else:
                keys, values = kc[:, :, :kv_len].index_select(0, row_slots), vc[:, :, :kv_len].index_select(0, row_slots)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(n, width, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        last_hidden = body.norm(hidden[torch.arange(n, device=hidden.device), last])
        return self.model.lm_head(last_hidden).float()

    def _sample(self, seq: int, logits, suppress_eos: bool) -> int:
        import torch

        _, gen, sampling = self._state[seq]
        if suppress_eos and self.eos_ids:
            logits = logits.clone()
            logits[list(self.eos_ids)] = float("-inf")
        if sampling.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=gen))
