"""The real generation loop (planner + scheduler + model thread + slot KV cache) with a tiny
random-weight Llama built from a config: fast, and exact against transformers' generate()."""
from __future__ import annotations

import asyncio

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from batchd.backends.generate import GenerateBackend, Sampling
from batchd.generate.engine import GenerateEngine, GenerationParams
from tests.helpers import make_config

VOCAB = 256


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def config(**generation):
    return make_config(server={"request_timeout_s": 60}, models=[{
        "name": "tiny", "backend": "generate", "path": "unused", "device": "cpu", "max_length": 128,
        "generation": {"max_running_seqs": 4, "max_prefill_tokens": 24, **generation}}])


async def started_engine(**generation) -> tuple[GenerateEngine, LlamaForCausalLM]:
    model = tiny_llama()
    cfg = config(**generation)
    engine = GenerateEngine(cfg.server, cfg.model, GenerateBackend(cfg.model, model=model))
    await engine.start()
    assert engine.state == "ready"
    return engine, model


def reference(model: LlamaForCausalLM, prompt: np.ndarray, n: int) -> list[int]:
    """generate() on one prompt alone, greedy, exactly n new tokens."""
    with torch.inference_mode():
        out = model.generate(torch.as_tensor(prompt)[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


async def run(engine: GenerateEngine, prompt: np.ndarray, n: int, sampling: Sampling | None = None,
              delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    params = GenerationParams(n, n, False, (), sampling or Sampling())
    seq = engine.admit(prompt, params, n, deadline=asyncio.get_running_loop().time() + 60)
    async for _ in engine.stream(seq):
        pass
    return seq.generated


def prompts(count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(3, 60))) for _ in range(count)]


async def test_greedy_output_equals_generate_while_sequences_join_and_leave():
    """Ten sequences, four slots, lengths 3-60 (some prefilled in chunks), 2-20 new tokens, arriving
    at different times: every one gets exactly what generate() gives it alone."""
    engine, model = await started_engine()
    try:
        ps = prompts(10)
        lengths = [2 + (7 * i) % 19 for i in range(10)]
        got = await asyncio.gather(*(run(engine, p, n, delay=0.003 * i) for i, (p, n) in enumerate(zip(ps, lengths))))
        for p, n, tokens in zip(ps, lengths, got):
            assert tokens == reference(model, p, n)
        snap = engine.snapshot()
        assert snap["mean_batch_size"] > 1.5  # they really shared steps
        assert snap["num_requests_running"] == 0 and engine.task.kv_tokens == 0
    finally:
        await engine.close()


async def test_prefill_first_schedule_gives_the_same_tokens():
    engine, model = await started_engine(schedule="prefill_first", max_prefill_tokens=8)
    try:
        ps = prompts(5, seed=2)
        got = await asyncio.gather(*(run(engine, p, 6, delay=0.002 * i) for i, p in enumerate(ps)))
        assert got == [reference(model, p, 6) for p in ps]
    finally:
        await engine.close()


async def test_sampling_with_a_seed_is_reproducible_and_differs_by_seed():
    engine, _ = await started_engine()
    try:
        p = prompts(1, seed=3)[0]
        hot = lambda seed: Sampling(temperature=1.5, top_p=0.95, seed=seed)  # noqa: E731
        a, b, c = await asyncio.gather(run(engine, p, 16, hot(7)), run(engine, p, 16, hot(7)), run(engine, p, 16, hot(8)))
        assert a == b
        assert a != c
    finally:
        await engine.close()


async def test_a_storm_of_cancellations_leaves_nothing_running_and_no_cache_in_use():
    engine, _ = await started_engine()
    try:
        tasks = [asyncio.create_task(run(engine, p, 100)) for p in prompts(12, seed=4)]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):  # the cancelled leave at the next step
            if not engine.task.running and not engine.task.waiting_count:
                break
            await asyncio.sleep(0.01)
        assert engine.task.running == {} and engine.task.kv_tokens == 0
        assert engine.snapshot()["kv_cache_usage_perc"] == 0
        assert engine.stats.outcomes["cancelled"] == 12
        assert sorted(engine.backend._free_slots) == list(range(4))  # every slot back on the model thread
        # and the engine still serves
        p = prompts(1, seed=5)[0]
        assert len(await run(engine, p, 5)) == 5
    finally:
        await engine.close()


async def test_eos_ends_a_sequence_unless_ignored():
    """Without min_tokens or ignore_eos a sampled eos ends the sequence with reason stop."""
    engine, model = await started_engine()
    try:
        # force eos: a model whose lm_head favours token 2 everywhere
        with torch.no_grad():
            model.lm_head.weight[2] += 5.0
        p = prompts(1, seed=6)[0]
        seq = engine.admit(p, GenerationParams(10, 0, False, (), Sampling()), 10, deadline=1e12)
        chunks = [c async for c in engine.stream(seq)]
        assert chunks[-1][1] == "stop" and seq.generated == [2]
        seq = engine.admit(p, GenerationParams(10, 0, True, (), Sampling()), 10, deadline=1e12)
        chunks = [c async for c in engine.stream(seq)]
        assert chunks[-1][1] == "length" and len(seq.generated) == 10 and 2 not in seq.generated
    finally:
        await engine.close()
