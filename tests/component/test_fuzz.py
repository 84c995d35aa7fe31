"""Property test: random bodies and headers thrown at one running app never produce a 5xx (nor a
hang, nor a non-JSON body), 4xx come in the OpenAI error shape, and afterwards the server still
answers correctly and its counters still reconcile."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from batchd.backends.fake import FakeBackend
from tests.helpers import app_client, fake_config

URL = "/v1/embeddings"
MAGIC_IDS = {3, 5}  # the fake backend's poison and fatal ids: their 500/503 are by design


class LoopThread:
    """One event loop in a thread, so one app (and one engine) serves every hypothesis example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served():
    lt = LoopThread()
    stack = contextlib.AsyncExitStack()
    config = fake_config(batching={"max_inputs_per_request": 16, "max_wait_ms": 0},
                         model={"max_length": 64}, server={"max_body_bytes": 64 * 1024})
    client, engine = lt.run(stack.enter_async_context(app_client(config)))
    try:
        yield lt, client, engine
    finally:
        lt.run(stack.aclose())
        lt.close()


json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=20)
token_id = st.one_of(st.integers(min_value=0, max_value=40000), st.integers(),
                     st.integers(min_value=2**62, max_value=2**70), st.integers(min_value=-(2**70), max_value=-1))
text = st.text(max_size=80)
input_value = st.one_of(
    text, st.lists(text, max_size=20), st.lists(token_id, max_size=80),
    st.lists(st.lists(token_id, max_size=70), max_size=5), st.lists(st.one_of(text, token_id), max_size=5),
    json_value)
request_obj = st.fixed_dictionaries(
    {},
    optional={
        "input": input_value,
        "model": st.one_of(st.just("fake"), json_value),
        "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_value),
        "dimensions": st.one_of(st.integers(min_value=-3, max_value=40), json_value),
        "user": st.one_of(text, json_value),
        "truncate": st.one_of(st.booleans(), json_value),
        "extra": json_value,
    })


valid_request = st.fixed_dictionaries(  # well-typed fields, so the input's own checks get exercised
    {"input": input_value},
    optional={
        "model": st.just("fake"),
        "encoding_format": st.sampled_from(["float", "base64"]),
        "dimensions": st.integers(min_value=-3, max_value=40),
        "truncate": st.booleans(),
    })


def _encode(obj) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. integers beyond 64 bits: send them as Python writes them
        return repr(obj).replace("None", "null").replace("True", "true").replace("False", "false").encode()


body = st.one_of(
    valid_request.map(_encode),
    request_obj.map(_encode),
    json_value.map(_encode),
    st.binary(max_size=200),
    request_obj.map(_encode).flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda i: b[:i])),  # cut
)
content_type = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                "text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data"])
timeout_header = st.one_of(st.none(), st.sampled_from(["0", "-1", "abc", "nan", "inf", "1e308", "0.5", "30"]))


def _has_magic(raw: bytes) -> bool:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    flat = []
    stack = [obj.get("input")] if isinstance(obj, dict) else []
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            flat.append(v)
    return any(type(v) is int and v in MAGIC_IDS for v in flat)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=body, ctype=content_type, timeout=timeout_header)
def test_random_bodies_never_5xx(served, raw, ctype, timeout):
    assume(not _has_magic(raw))
    lt, client, engine = served
    headers = {"content-type": ctype}
    if timeout is not None:
        headers["x-request-timeout"] = timeout
    r = lt.run(client.post(URL, content=raw, headers=headers))
    assert r.status_code < 500, (raw[:200], r.status_code, r.text)
    payload = r.json()
    if r.status_code == 200:
        assert payload["object"] == "list" and payload["data"]
        assert [d["index"] for d in payload["data"]] == list(range(len(payload["data"])))
    else:
        assert 400 <= r.status_code < 500
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in r.text


def test_still_correct_after_the_fuzz(served):
    """Runs after the property test (same module fixture): the engine is healthy and exact."""
    lt, client, engine = served
    assert lt.run(client.get("/health")).status_code == 200
    r = lt.run(client.post(URL, json={"input": ["hello world", "bye"]}))
    assert r.status_code == 200
    reference = FakeBackend(engine.model_config)
    reference.load()
    expected, _ = reference.embed(reference.tokenize(["hello world"], False))
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], expected[0], rtol=1e-6)
    stats = lt.run(client.get("/stats")).json()
    assert stats["requests_total"] == sum(stats["outcomes"].values())
    assert stats["queue_depth"] == 0 and engine.active_requests == 0
    assert stats["requests_total"] >= 1 and sum(stats["rejections"].values()) >= 1
