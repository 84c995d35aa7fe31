"""Bad input never becomes a 500 or a hang: each case is a 4xx in the OpenAI error shape that names
the offending field, and the server keeps answering. Also the access rules (API key, loopback bind,
no stack traces in bodies, no input text in logs unless asked)."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import httpx
import pytest

from batchd.api.app import create_app
from batchd.config import Config, load_config
from tests.helpers import ROOT, app_client, fake_config, running_engine

URL = "/v1/embeddings"


def assert_error(r: httpx.Response, status: int, param: str | None = ..., code: str | None = ...) -> dict:  # type: ignore[assignment]
    """The OpenAI error shape, exactly, with no internals leaking into it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


@asynccontextmanager
async def client_for(config: Config, raise_app_exceptions: bool = True):
    async with running_engine(config) as engine:
        app = create_app(config, engine)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://batchd.test", timeout=30) as client:
            yield client, engine


LONG = " ".join(["word"] * 400)  # 402 fake tokens > max_length 256
JSON = {"content-type": "application/json"}

# (name, raw body, headers, status, param, code)
BAD = [
    ("invalid json", b'{"input": "a"', JSON, 400, None, "invalid_json"),
    ("not json at all", b"hello", JSON, 400, None, "invalid_json"),
    ("empty body", b"", JSON, 400, None, "invalid_json"),
    ("wrong content type", b'{"input": "a"}', {"content-type": "text/plain"}, 415, None, "unsupported_media_type"),
    ("form content type", b"input=a", {"content-type": "application/x-www-form-urlencoded"}, 415, ..., ...),
    ("top level array", b'["a"]', JSON, 400, None, "invalid_value"),
    ("input is a number", b'{"input": 5}', JSON, 400, "input", "invalid_value"),
    ("input is an object", b'{"input": {"a": 1}}', JSON, 400, "input", "invalid_value"),
    ("input null", b'{"input": null}', JSON, 400, "input", "invalid_value"),
    ("input list of floats", b'{"input": [1.5]}', JSON, 400, "input[0]", "invalid_value"),
    ("input list of bools", b'{"input": [true]}', JSON, 400, "input[0]", "invalid_value"),
    ("mixed strings and ids", b'{"input": ["a", 3]}', JSON, 400, "input", "invalid_value"),
    ("mixed strings and id lists", b'{"input": ["a", [3]]}', JSON, 400, "input", "invalid_value"),
    ("string inside id list", b'{"input": [[1, "a"]]}', JSON, 400, "input[0][1]", "invalid_value"),
    ("missing input", b'{"model": "fake"}', JSON, 400, "input", "invalid_value"),
    ("empty object", b"{}", JSON, 400, "input", "invalid_value"),
    ("empty string", b'{"input": ""}', JSON, 400, "input", "invalid_value"),
    ("empty string in list", b'{"input": ["a", ""]}', JSON, 400, "input[1]", "invalid_value"),
    ("empty list", b'{"input": []}', JSON, 400, "input", "invalid_value"),
    ("empty token list", b'{"input": [[]]}', JSON, 400, "input", "invalid_value"),
    ("too many inputs", b'{"input": ["a", "b", "c", "d", "e"]}', JSON, 400, "input", "invalid_value"),
    ("too long text", b'{"input": "%s"}' % LONG.encode(), JSON, 400, "input", "context_length_exceeded"),
    ("too long text in list", b'{"input": ["a", "%s"]}' % LONG.encode(), JSON, 400, "input[1]",
     "context_length_exceeded"),
    ("too long token list", b'{"input": [%s]}' % b",".join([b"7"] * 300), JSON, 400, "input",
     "context_length_exceeded"),
    ("negative token id", b'{"input": [[-1, 5]]}', JSON, 400, "input", "invalid_value"),
    ("token id past vocab", b'{"input": [5, 30000]}', JSON, 400, "input", "invalid_value"),
    ("token id past int64", b'{"input": [[5, 18446744073709551615]]}', JSON, 400, "input", "invalid_value"),
    ("huge token id", b'{"input": [[5, 1%s]]}' % (b"0" * 40), JSON, 400, "input", "invalid_value"),
    ("negative dimensions", b'{"input": "a", "dimensions": -1}', JSON, 400, "dimensions", "invalid_value"),
    ("zero dimensions", b'{"input": "a", "dimensions": 0}', JSON, 400, "dimensions", "invalid_value"),
    ("too large dimensions", b'{"input": "a", "dimensions": 33}', JSON, 400, "dimensions", "invalid_value"),
    ("dimensions out of range", b'{"input": "a", "dimensions": 1e400}', JSON, 400, "dimensions", ...),
    ("dimensions as string", b'{"input": "a", "dimensions": "8"}', JSON, 400, "dimensions", "invalid_value"),
    ("unknown model", b'{"input": "a", "model": "gpt-17"}', JSON, 404, "model", "model_not_found"),
    ("bad encoding_format", b'{"input": "a", "encoding_format": "int8"}', JSON, 400, "encoding_format", ...),
    ("truncate not bool", b'{"input": "a", "truncate": "yes"}', JSON, 400, "truncate", "invalid_value"),
    ("non-utf8 bytes", b'{"input": "caf\xe9 \xff\xfe"}', JSON, 400, None, "invalid_json"),
    ("lone surrogate escape", b'{"input": "\\ud800"}', JSON, 400, None, "invalid_json"),
    ("deeply nested", b'{"input": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400, None,
     "invalid_json"),
    ("deeply nested input", b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", JSON, 400, ..., ...),
    ("bad timeout header", b'{"input": "a"}', {**JSON, "x-request-timeout": "soon"}, 400, "x-request-timeout", ...),
    ("negative timeout header", b'{"input": "a"}', {**JSON, "x-request-timeout": "-3"}, 400, "x-request-timeout",
     ...),
    ("nan timeout header", b'{"input": "a"}', {**JSON, "x-request-timeout": "nan"}, 400, "x-request-timeout", ...),
]


async def test_bad_inputs_are_4xx_naming_the_field_and_never_reach_the_model():
    config = fake_config(batching={"max_inputs_per_request": 4}, server={"max_body_bytes": 2_000_000})
    async with app_client(config) as (client, engine):
        for name, body, headers, status, param, code in BAD:
            r = await client.post(URL, content=body, headers=headers)
            try:
                assert_error(r, status, param, code)
            except AssertionError as exc:
                raise AssertionError(f"case {name!r}: {exc}") from None
        assert engine.backend.seen == []  # none of them ran
        assert engine.stats.requests_total == 0  # none was accepted
        rejections = (await client.get("/stats")).json()["rejections"]
        assert sum(rejections.values()) == len(BAD)
        assert rejections["invalid_json"] >= 5 and rejections["model_not_found"] == 1
        assert rejections["unsupported_media_type"] == 2
        # and it still serves correctly afterwards
        r = await client.post(URL, json={"input": ["a b", "c"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2


async def test_valid_variants_are_served():
    async with app_client(fake_config(batching={"max_inputs_per_request": 4})) as (client, engine):
        ok = [
            {"input": "a"},
            {"input": ["a", "b", "c", "d"]},  # exactly max_inputs_per_request
            {"input": [50, 60, 70]},  # one token-id list
            {"input": [[50, 60], [29999]]},
            {"input": "a", "model": "fake", "dimensions": 8, "encoding_format": "base64", "user": "u"},
            {"input": "a", "dimensions": 32},
            {"input": "   "},  # whitespace is text, not empty
            {"input": "\u0000 é 中文 🙂"},
        ]
        for body in ok:
            r = await client.post(URL, json=body)
            assert r.status_code == 200, (body, r.text)
        r = await client.post(URL, json={"input": "a b", "dimensions": 8})
        assert len(r.json()["data"][0]["embedding"]) == 8
        r = await client.post(URL, content=b'{"input": "a"}', headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        r = await client.post(URL, content=b'{"input": "a"}', headers={"content-type": ""})
        assert r.status_code in (200, 415)


async def test_too_long_is_truncated_when_asked():
    async with app_client(fake_config()) as (client, engine):
        r = await client.post(URL, json={"input": LONG, "truncate": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 256
        r = await client.post(URL, json={"input": [7] * 300, "truncate": True})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
        assert max(len(s) for s in engine.backend.seen) == 256
    async with app_client(fake_config(model={"truncate": True})) as (client, engine):
        r = await client.post(URL, json={"input": LONG})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
        r = await client.post(URL, json={"input": LONG, "truncate": False})  # the request wins
        assert_error(r, 400, "input", "context_length_exceeded")


async def test_body_over_limit_is_413_when_declared():
    async with app_client(fake_config(server={"max_body_bytes": 4096})) as (client, engine):
        r = await client.post(URL, json={"input": "x" * 5000})
        assert_error(r, 413, code="payload_too_large")
        r = await client.post(URL, json={"input": "x" * 3000})
        assert r.status_code == 200
        assert engine.stats.rejections["payload_too_large"] == 1


async def test_streamed_body_over_limit_is_413_without_being_read_whole():
    sent = []

    async def chunks():
        for i in range(100):  # 100 x 1 KiB, no content-length: the limit (4 KiB) shows early
            sent.append(i)
            yield b" " * 1024

    async with app_client(fake_config(server={"max_body_bytes": 4096})) as (client, engine):
        r = await client.post(URL, content=chunks(), headers=JSON)
        assert_error(r, 413, code="payload_too_large")
        assert len(sent) < 10  # refused after a few chunks, not after reading all 100


async def test_api_key_from_config_and_env(monkeypatch):
    monkeypatch.delenv("BATCHD_API_KEY", raising=False)
    async with app_client(fake_config(server={"api_key": "s3cret"})) as (client, engine):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}):
            assert_error(await client.post(URL, json={"input": "a"}, headers=headers), 401, code="invalid_api_key")
            assert_error(await client.get("/stats", headers=headers), 401)
            assert_error(await client.get("/v1/models", headers=headers), 401)
        r = await client.post(URL, json={"input": "a"}, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert (await client.get("/health")).status_code == 200  # probes need no key
        assert engine.backend.seen == [(1, engine.backend.tokenize(["a"], False)[0][1], 2)]
        assert engine.stats.rejections["invalid_api_key"] == 4
    monkeypatch.setenv("BATCHD_API_KEY", "from-env")
    async with app_client(fake_config(server={"api_key": "s3cret"})) as (client, engine):
        assert_error(await client.post(URL, json={"input": "a"}, headers={"authorization": "Bearer s3cret"}), 401)
        r = await client.post(URL, json={"input": "a"}, headers={"authorization": "Bearer from-env"})
        assert r.status_code == 200
    monkeypatch.delenv("BATCHD_API_KEY")
    async with app_client(fake_config()) as (client, engine):  # no key configured: open
        assert (await client.post(URL, json={"input": "a"})).status_code == 200


def test_binds_loopback_by_default():
    assert Config().server.host == "127.0.0.1"
    assert load_config(ROOT / "config.toml").server.host == "127.0.0.1"


async def test_poisoned_input_500_hides_internals():
    async with app_client(fake_config()) as (client, engine):
        r = await client.post(URL, json={"input": "__poison__ here"})
        assert_error(r, 500, code="inference_failed")
        assert "poison" not in r.text and "ValueError" not in r.text


async def test_unexpected_error_is_a_bare_500(monkeypatch):
    async with client_for(fake_config(), raise_app_exceptions=False) as (client, engine):
        def broken(texts, truncate):
            raise RuntimeError("secret internals at /opt/model/weights")
        monkeypatch.setattr(engine.backend, "tokenize", broken)
        r = await client.post(URL, json={"input": "a"})
        assert_error(r, 500, None, "internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text and "/opt" not in r.text


@pytest.mark.parametrize("log_inputs", [False, True])
async def test_logs_hold_input_text_only_when_asked(caplog, log_inputs):
    caplog.set_level(logging.DEBUG)
    secret = "zanzibar-private-phrase"
    async with app_client(fake_config(server={"log_inputs": log_inputs})) as (client, engine):
        assert (await client.post(URL, json={"input": [secret, "other"]})).status_code == 200
        assert (await client.post(URL, json={"input": [f"{secret} __poison__", "x"]})).status_code == 500
        assert (await client.post(URL, json={"input": secret, "model": "nope"})).status_code == 404
        assert (await client.post(URL, json={"input": " ".join([secret] * 300)})).status_code == 400
    assert (secret in caplog.text) is log_inputs


async def test_client_leaving_mid_body_is_not_an_internal_error(caplog):
    """A client that disconnects before sending its whole body: no 500, no ERROR log, counted."""
    config = fake_config()
    async with running_engine(config) as engine:
        app = create_app(config, engine)
        messages = [{"type": "http.request", "body": b'{"input": "ab', "more_body": True}, {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": URL, "raw_path": URL.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert statuses == [499]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert engine.stats.rejections["client_disconnected"] == 1 and engine.backend.seen == []
