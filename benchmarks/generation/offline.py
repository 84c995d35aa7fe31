"""The in-process baselines (no HTTP), each returning per-request records (see metrics.py).

  sequential  one `model.generate()` per request, in arrival order, batch 1
  static      request-level batches of `size` in arrival order, left-padded; a batch runs until its
              longest max_tokens, and only each request's own tokens count as output
  manager     transformers' ContinuousBatchingManager (paged KV cache, iteration-level scheduling),
              with explicit sizes, closed loop (all submitted at once) or Poisson arrivals

What is timed
  generate(): a streamer (TokenClock) stamps perf_counter() each time generate() hands it the
  new tokens of a decoding step, i.e. right after the step's argmax; the first put() (the prompt) is
  skipped. Works for any batch size (the streamer sees one token per row per step).
  manager: `record_timestamps=True` makes the manager stamp perf_counter() when it appends each token
  to the request (in its generation thread), the same moment a streaming server could send it.
  Closed loop: every request arrives at t=0, so queueing behind earlier work counts in TTFT.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from .metrics import record
from .workload import ChatRequest

EOS = 2


class TokenClock:
    """A generate() streamer that keeps only the time of each decoding step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:  # generate() first puts the prompt ids
            self._prompt = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _quiet_transformers() -> None:
    import logging as std_logging

    from transformers.utils import logging

    logging.set_verbosity_error()
    # the manager's own logger ("Processor SuppressTokensLogitsProcessor might not be supported by CB")
    std_logging.getLogger("ContinuousBatchingLogger").setLevel(std_logging.ERROR)


def _generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, clock: TokenClock):
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=EOS, eos_token_id=EOS,
                              streamer=clock)


def warmup(model, tok, n: int = 4) -> None:
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"]])
    _generate(model, ids, torch.ones_like(ids), n, TokenClock())


def sequential(model, reqs: list[ChatRequest], max_s: float = 900.0, log=None) -> list[dict]:
    """One generate() per request, one after the other; all requests arrived at t=0."""
    _quiet_transformers()
    out: list[dict] = []
    t0 = time.perf_counter()
    for r in reqs:
        if time.perf_counter() - t0 > max_s:
            out.append(record(r.i, 0.0, [], 0, error="not run: time bound"))
            continue
        ids = torch.tensor([r.prompt_ids])
        clock = TokenClock()
        start = time.perf_counter()
        gen = _generate(model, ids, torch.ones_like(ids), r.max_tokens, clock)[0, ids.shape[1]:].tolist()
        out.append(record(r.i, 0.0, [t - t0 for t in clock.times], len(gen), start=round(start - t0, 6), ids=gen))
        if log and (r.i + 1) % 8 == 0:
            log(f"  sequential: {r.i + 1}/{len(reqs)} requests, {time.perf_counter() - t0:.0f} s")
    return out


def static(model, tok, reqs: list[ChatRequest], size: int = 8, max_s: float = 900.0, log=None) -> list[dict]:
    """Batches of `size` in arrival order, each left-padded and run to its longest max_tokens."""
    _quiet_transformers()
    out: list[dict] = []
    t0 = time.perf_counter()
    for b in range(0, len(reqs), size):
        batch = reqs[b:b + size]
        if time.perf_counter() - t0 > max_s:
            out += [record(r.i, 0.0, [], 0, error="not run: time bound") for r in batch]
            continue
        enc = tok.pad({"input_ids": [r.prompt_ids for r in batch]}, padding=True, return_tensors="pt")
        steps = max(r.max_tokens for r in batch)
        clock = TokenClock()
        start = time.perf_counter()
        gen = _generate(model, enc["input_ids"], enc["attention_mask"], steps, clock)[:, enc["input_ids"].shape[1]:]
        for j, r in enumerate(batch):
            own = clock.times[:r.max_tokens]
            out.append(record(r.i, 0.0, [t - t0 for t in own], len(own), start=round(start - t0, 6),
                              batch=b // size, batch_steps=steps, ids=gen[j, :r.max_tokens].tolist()))
        if log:
            log(f"  static-{size}: batch {b // size + 1}/{(len(reqs) + size - 1) // size} ({steps} steps), "
                f"{time.perf_counter() - t0:.0f} s")
    return out


# ---- transformers' ContinuousBatchingManager ------------------------------------------------------

def manager_sizes(reqs: list[ChatRequest], max_seqs: int, max_batch_tokens: int, page_size: int) -> dict:
    """Explicit sizes: a KV cache that holds `max_seqs` of the workload's longest requests, so the
    manager neither sizes itself from free memory nor has to evict/offload."""
    longest = max(r.prompt_tokens + r.max_tokens for r in reqs)
    per_seq = -(-longest // page_size)
    return {"max_requests_per_batch": max_seqs, "max_batch_tokens": max_batch_tokens, "page_size": page_size,
            "num_blocks": max_seqs * per_seq + 2}


def make_manager(model, sizes: dict, prefix_sharing: bool = False):
    """A started manager, greedy. Every request decodes exactly max_new_tokens: eos stops nothing
    (eos_token_id=-1 per request) and is never picked (suppress_tokens=[eos], which is what
    generate()'s min_new_tokens = max_new_tokens does, and vLLM's min_tokens; the CB path drops
    MinNewTokensLengthLogitsProcessor, and without the suppression the model emits <|im_end|> and
    carries on after it, so its text differs from generate()'s)."""
    _quiet_transformers()
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=128,
                           suppress_tokens=[EOS])
    cb = ContinuousBatchingConfig(page_size=sizes["page_size"], num_blocks=sizes["num_blocks"],
                                  max_batch_tokens=sizes["max_batch_tokens"],
                                  max_requests_per_batch=sizes["max_requests_per_batch"],
                                  allow_block_sharing=prefix_sharing, use_async_batching=False,
                                  use_cuda_graph=False)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    mgr.start()
    return mgr


def manager_resolved(mgr) -> dict:
    c = mgr.continuous_batching_config
    return {k: getattr(c, k) for k in ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                                       "max_blocks_per_request", "allow_block_sharing", "use_async_batching",
                                       "max_memory_percent")} | {"attn": mgr.model.config._attn_implementation}


def manager_warmup(mgr, tok) -> None:
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    _run_manager(mgr, [ChatRequest(-1, "Hello", list(ids), 4, 0)] * 2, None, "warmup", 60.0)


def manager_run(mgr, reqs: list[ChatRequest], arrivals: list[float] | None, tag: str,
                max_s: float = 900.0) -> list[dict]:
    """Closed loop (arrivals None: all submitted at t=0) or open loop (submit each at its arrival)."""
    return _run_manager(mgr, reqs, arrivals, tag, max_s)


def _run_manager(mgr, reqs, arrivals, tag, max_s) -> list[dict]:
    arrivals = arrivals if arrivals is not None else [0.0] * len(reqs)
    pending = deque(zip(reqs[:len(arrivals)], arrivals))
    submitted: dict[str, tuple[ChatRequest, float, int]] = {}
    done: dict[str, object] = {}
    t0 = time.perf_counter()
    deadline = t0 + max_s
    k = 0
    # one consumer for the shared output queue (get_result(request_id=...) re-queues others' results)
    while (pending or len(done) < len(submitted)) and time.perf_counter() < deadline:
        now = time.perf_counter() - t0
        while pending and pending[0][1] <= now:
            r, at = pending.popleft()
            rid = f"{tag}-{k}"
            k += 1
            mgr.add_request(list(r.prompt_ids), request_id=rid, max_new_tokens=r.max_tokens, record_timestamps=True,
                            eos_token_id=-1)
            submitted[rid] = (r, at, k - 1)
        wait = (pending[0][1] - (time.perf_counter() - t0)) if pending else 0.5
        res = mgr.get_result(timeout=min(0.5, max(0.0005, wait)))
        if res is not None and res.is_finished() and res.request_id in submitted:
            done[res.request_id] = res
        if not mgr.is_running():
            break
    out = []
    for rid, (r, at, _) in submitted.items():
        res = done.get(rid)
        if res is None:
            mgr.cancel_request(rid)
            out.append(record(r.i, at, [], 0, error="timeout"))
            continue
        err = res.error or ("" if len(res.generated_tokens) == r.max_tokens else
                            f"{len(res.generated_tokens)} tokens, asked {r.max_tokens}")
        out.append(record(r.i, at, [t - t0 for t in (res.timestamps or [])], len(res.generated_tokens),
                          start=round(res.lifespan[0] - t0, 6), ids=list(res.generated_tokens), **({"error": err} if err else {})))
    for r, at in pending:
        out.append(record(r.i, at, [], 0, error="not submitted: time bound"))
    return out


def cancel_probe(mgr, reqs: list[ChatRequest], cancel_after: int = 8, watch_s: float = 3.0) -> dict:
    """What a cancelled request does: two streaming requests; cancel A after `cancel_after` of its
    tokens; watch A's outputs, the scheduler's tables and B's progress."""
    a, b = reqs[0], reqs[1]
    n = 64
    mgr.add_request(list(a.prompt_ids), request_id="probe-a", max_new_tokens=n, streaming=True, eos_token_id=-1)
    mgr.add_request(list(b.prompt_ids), request_id="probe-b", max_new_tokens=n, streaming=True, eos_token_id=-1)
    seen = {"probe-a": 0, "probe-b": 0}
    a_at_cancel = None
    a_after: list[tuple[int, str]] = []
    b_final = None
    t_cancel = None
    give_up = time.perf_counter() + 120
    while time.perf_counter() < give_up:
        res = mgr.get_result(timeout=0.2)
        if t_cancel is not None and time.perf_counter() - t_cancel > watch_s and b_final is not None:
            break
        if res is None:
            continue
        if res.request_id in seen:
            seen[res.request_id] = len(res.generated_tokens)
        if res.request_id == "probe-a":
            if t_cancel is not None:
                a_after.append((len(res.generated_tokens), res.status.name))
            elif len(res.generated_tokens) >= cancel_after:
                a_at_cancel = len(res.generated_tokens)
                mgr.cancel_request("probe-a")
                t_cancel = time.perf_counter()
        elif res.request_id == "probe-b" and res.is_finished():
            b_final = len(res.generated_tokens)
    sched = mgr.batch_processor.scheduler if mgr.batch_processor else None
    return {"a_tokens_at_cancel": a_at_cancel, "a_outputs_after_cancel": len(a_after),
            "a_tokens_after_cancel": a_after[-1][0] if a_after else a_at_cancel,
            "a_final_output_delivered": any(s in ("FINISHED", "FAILED") for _, s in a_after),
            "a_still_scheduled": bool(sched and ("probe-a" in sched.active_requests or "probe-a" in sched.waiting_requests)),
            "b_tokens": b_final, "watched_s": watch_s}


# ---- greedy agreement ------------------------------------------------------------------------------

def agreement(ref: list[dict], other: list[dict], tok=None, texts: bool = False) -> dict:
    """How many requests' greedy outputs differ from the reference (same request index), and where
    the first difference is. `texts`: compare decoded text (for HTTP results) instead of token ids."""
    by_i = {r["i"]: r for r in ref if r.get("ids") is not None and not r.get("error")}
    compared = differ = 0
    first_diff: list[int] = []
    examples = []
    for r in other:
        base = by_i.get(r["i"])
        if base is None or r.get("error"):
            continue
        if texts:
            if r.get("text") is None:
                continue
            a, b = tok.decode(base["ids"], skip_special_tokens=True), r["text"]
        else:
            if r.get("ids") is None:
                continue
            a, b = base["ids"], r["ids"]
        compared += 1
        if a != b:
            differ += 1
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            first_diff.append(k)
            if len(examples) < 2 and tok is not None and not texts:
                examples.append({"i": r["i"], "at_token": k, "ref": tok.decode(a[k:k + 12]), "got": tok.decode(b[k:k + 12])})
    return {"compared": compared, "differ": differ, "first_diff_median": sorted(first_diff)[len(first_diff) // 2]
            if first_diff else None, "unit": "chars" if texts else "tokens", "examples": examples}
