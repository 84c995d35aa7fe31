"""The Hypercorn config batchd serves with (batchd/server.py)."""
from __future__ import annotations

from wsgiref.handlers import format_date_time

from batchd import server
from batchd.config import load_config
from batchd.server import hypercorn_config


def test_date_header_is_the_current_http_date_once_per_response(monkeypatch):
    hc = hypercorn_config(load_config(None), "127.0.0.1:0")
    clock = [1_800_000_000.2]
    monkeypatch.setattr(server.time, "time", lambda: clock[0])
    first = hc.response_headers("h11")
    assert [v for k, v in first if k == b"date"] == [format_date_time(1_800_000_000).encode()]
    assert (b"server", b"hypercorn-h11") in first
    clock[0] += 1.0  # the next second: a new date, never a stale one
    assert [v for k, v in hc.response_headers("h11") if k == b"date"] == [format_date_time(1_800_000_001).encode()]


def test_backlog_lets_a_thousand_clients_connect_at_once():
    assert hypercorn_config(load_config(None), "127.0.0.1:0").backlog >= 1024
