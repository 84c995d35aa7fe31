"""A real `batchd serve` process (Hypercorn) on 127.0.0.1, the default config and the real model."""
from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np
import pytest

from batchd.backends.embed import EmbedBackend
from batchd.config import load_config
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_backend():
    backend = EmbedBackend(load_config(ROOT / "config.toml", ["model.device=cpu"]).model)
    backend.load()  # this thread becomes its model thread
    return backend


def _texts(n: int) -> list[str]:
    rng = random.Random(1234)
    words = ("server batch queue latency token model thread vector padding bucket budget client "
             "request future scheduler throughput").split()
    return [" ".join(rng.choice(words) for _ in range(rng.choice([2, 6, 14, 40, 90, 180]))) + f" #{i}"
            for i in range(n)]


def test_200_concurrent_clients_each_get_their_own_vector(server, reference_backend):
    texts = _texts(200)
    httpx.post(f"{server}/stats/reset")

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": t, "model": "all-MiniLM-L6-v2"})
                                          for t in texts))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 200
    got = np.asarray([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    expected = np.concatenate([reference_backend.embed(reference_backend.tokenize([t], False))[0] for t in texts])
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() >= 0.9999
    stats = httpx.get(f"{server}/stats").json()
    assert stats["requests_total"] == 200
    assert stats["batches_total"] < stats["requests_total"]
    assert 0.0 <= stats["padding_ratio"] < 1.0
    assert stats["outcomes"]["completed"] == 200 and stats["queue_depth"] == 0


def test_openai_client_works_against_batchd(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server}/v1", api_key="unused") as client:
        result = client.embeddings.create(model="all-MiniLM-L6-v2", input=["This is an example sentence", "hi"])
    assert [d.index for d in result.data] == [0, 1]
    np.testing.assert_allclose(result.data[0].embedding[:3], [0.0677, 0.0635, 0.0487], atol=1e-4)
    # the client's default encoding is base64: it decoded it back to the same floats
    assert len(result.data[1].embedding) == 384
    assert result.usage.prompt_tokens == 7 + 3


def test_ops_endpoints(server):
    assert httpx.get(f"{server}/health").json() == {
        "status": "ready", "models": {"all-MiniLM-L6-v2": "ready", "SmolLM2-135M-Instruct": "ready"}}
    models = httpx.get(f"{server}/v1/models").json()
    assert [(m["id"], m["task"]) for m in models["data"]] == [("all-MiniLM-L6-v2", "embed"),
                                                             ("SmolLM2-135M-Instruct", "generate")]
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("batchd_queue_size", "batchd_batch_size_bucket", "batchd_batch_padded_tokens_total",
                 "batchd_request_queue_duration_seconds_bucket", "batchd_request_inference_duration_seconds_bucket"):
        assert name in metrics
    missing = httpx.get(f"{server}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
