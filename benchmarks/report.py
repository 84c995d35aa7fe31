"""Summary tables (stdout + summary.md), target ratios (summary.json) and the plots of one run."""
from __future__ import annotations

import json

from .harness import Run


def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _find(records: list[dict], **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _one(records: list[dict], **match) -> dict | None:
    found = _find(records, **match)
    return found[-1] if found else None


def targets(records: list[dict]) -> list[dict]:
    """Each target: value, unit, goal, pass. Ratios only compare figures measured side by side in one run."""
    out = []

    def add(name: str, value, unit: str, goal: str, ok, detail: str = "", *recs) -> None:
        foreign = max((r.get("foreign_cpu", 0.0) for r in recs if r), default=None)
        out.append({"target": name, "value": value, "unit": unit, "goal": goal,
                    "pass": None if value is None else bool(ok), "detail": detail, "foreign_cpu": foreign})

    def ceil_recs(when_prefix: str, tag: str = "fp32") -> list[dict]:
        return [r for r in records if r["kind"] == "ceiling" and r["tag"] == tag and r["mix"] == "real"
                and (r["when"].startswith(when_prefix) or when_prefix == "*")]

    c128 = _one(records, kind="closed", server="batchd", mix="real", concurrency=128)
    c512 = _one(records, kind="closed", server="batchd", mix="real", concurrency=512)
    sat = _one(records, kind="saturation")
    v = sat["vs_ceiling"] if sat else None
    add("batchd c=128 / offline ceiling", v, "x", ">= 0.9x", v is not None and v >= 0.9,
        f"{_f(sat and sat['texts_s'])} vs {_f(sat and sat['ceiling_before'])} / {_f(sat and sat['ceiling_after'])} "
        f"texts/s (ceiling read just before / after); the ceiling at batchd's mean batch "
        f"({_f(sat and sat.get('batchd_mean_batch'))}) does {_f(sat and sat.get('ceiling_at_batchd_batch'))} texts/s",
        c128, *ceil_recs("before c="), *ceil_recs("after c="))
    for c in (32, 128):
        b = _one(records, kind="closed", server="batchd", mix="real", concurrency=c)
        n = _one(records, kind="closed", server="no-batch", mix="real", concurrency=c)
        v = b["texts_s"] / n["texts_s"] if b and n and n["texts_s"] else None
        add(f"batchd / no-batching, c={c}", v, "x", ">= 2x", v is not None and v >= 2,
            f"{_f(b and b['texts_s'])} vs {_f(n and n['texts_s'])} texts/s", b, n)
    pad = c128["stats"].get("padding_ratio") if c128 else None
    ceil_pad = _one(records, kind="ceiling", mix="real", tag="fp32")
    add("padding ratio at saturation (c=128)", pad, "%", "<= 5%", pad is not None and pad <= 0.05,
        f"offline sorted ceiling pads {_f(ceil_pad and ceil_pad['padding_ratio'] * 100)}%; "
        f"mean batch {_f(c128 and c128['stats'].get('mean_batch_size'))} vs ceiling {_f(ceil_pad and ceil_pad['mean_batch_size'])}",
        c128)
    c1 = _one(records, kind="c1")
    b1 = _one(records, kind="batch1", tag="fp32")
    v = c1["p50_ms"] - b1["p50_ms"] if c1 and b1 and c1["p50_ms"] is not None else None
    add("c=1 p50 latency - offline batch-1 forward", v, "ms", "<= +2 ms", v is not None and v <= 2,
        f"{_f(c1 and c1['p50_ms'], '{:.2f}')} vs {_f(b1 and b1['p50_ms'], '{:.2f}')} ms, same text "
        f"({b1 and b1['tokens']} tokens); server says model {_f(c1 and c1['stats']['latency_ms']['model_time']['p50'], '{:.2f}')} ms",
        c1)
    best = {}
    for r in _find(records, kind="overhead"):
        best[r["server"]] = max(best.get(r["server"], 0.0), r["req_s"])
    v = best["batchd-fake"] / best["bare"] if best.get("bare") and "batchd-fake" in best else None
    add("batchd (fake, 0 ms) / bare Starlette+Hypercorn", v, "x", ">= 0.7x", v is not None and v >= 0.7,
        f"{best.get('batchd-fake', 0):.0f} vs {best.get('bare', 0):.0f} req/s (best of interleaved rounds)",
        *_find(records, kind="overhead"))
    v = c512["texts_s"] / c128["texts_s"] if c512 and c128 and c128["texts_s"] else None
    add("batchd c=512 / c=128 throughput", v, "x", ">= 0.9x (no collapse)", v is not None and v >= 0.9,
        f"RSS after c=128 {_f(c128 and c128.get('rss_mb'), '{:.0f}')} MB, after c=512 {_f(c512 and c512.get('rss_mb'), '{:.0f}')} MB "
        f"(peak {_f(c512 and c512.get('peak_rss_mb'), '{:.0f}')} MB)", c128, c512)
    bf = _one(records, kind="saturation_bf16")
    v = bf["vs_ceiling"] if bf else None
    fp = _one(records, kind="saturation")
    add("batchd bf16 c=128 / bf16 offline ceiling", v, "x", ">= 0.9x", v is not None and v >= 0.9,
        f"{_f(bf and bf['texts_s'])} vs {_f(bf and bf['ceiling_before'])} / {_f(bf and bf['ceiling_after'])} texts/s "
        f"(fp32: {_f(fp and fp['texts_s'])} vs {_f(fp and fp['ceiling_before'])})",
        _one(records, kind="closed", server="batchd-bf16"), *ceil_recs("*", "bf16"))
    cc = _one(records, kind="client_ceiling")
    peak = max((r["req_s"] for r in records if r["kind"] in ("closed", "open", "list", "overhead", "c1")), default=0)
    v = cc["req_s"] / peak if cc and peak else None
    add("client headroom: client ceiling / highest req/s driven", v, "x", ">= 2x", v is not None and v >= 2,
        f"{_f(cc and cc['req_s'], '{:.0f}')} vs {peak:.0f} req/s; client cpu at most "
        f"{max((r.get('client_cpu', 0) for r in records if r['kind'] != 'client_ceiling'), default=0):.2f} core "
        "outside the client-ceiling probe")
    return out


def tables(run: Run) -> str:
    rec = run.records
    lines = []
    meta = _one(rec, kind="meta") or {}
    lines.append(f"# batchd benchmark ({meta.get('profile')}), model {meta.get('model')} {meta.get('dtype')}, "
                 f"batching {json.dumps(meta.get('batching'))}")
    lines.append(f"cpu: {json.dumps(meta.get('cpu'))}")
    lines.append("")
    lines.append("## Workload (token counts include [CLS]/[SEP])")
    lines.append("| mix | texts | mean | p10 | p50 | p90 | p99 | max | histogram |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for w in _find(rec, kind="workload"):
        hist = " ".join(f"{k}:{v}" for k, v in w["histogram"].items())
        lines.append(f"| {w['mix']} | {w['texts']} | {w['tokens_mean']} | {w['tokens_p10']} | {w['tokens_p50']} | "
                     f"{w['tokens_p90']} | {w['tokens_p99']} | {w['tokens_max']} | {hist} |")
    lines.append("")
    lines.append("## Offline ceiling (sorted, token-budgeted batches, no HTTP)")
    lines.append("| dtype | mix | when | texts/s | tokens/s | mean batch | padding | foreign cpu |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for c in _find(rec, kind="ceiling"):
        lines.append(f"| {c['tag']} | {c['mix']} | {c['when']} | {c['texts_s']:.1f} | {c['tokens_s']:.0f} | "
                     f"{c['mean_batch_size']:.1f} | {c['padding_ratio']:.1%} | {c.get('foreign_cpu', 0):.2f} |")
    lines.append("")
    lines.append("## Closed loop (N inputs per request; vs ceiling = texts/s over the offline ceiling of the same mix and "
                 "dtype read next to it; cpu columns in cores, foreign = other jobs on the machine)")
    lines.append("| server | mix | N | c | texts/s | tokens/s | req/s | p50 ms | p90 ms | p99 ms | errors | "
                 "mean batch | padding | vs ceiling | server cpu | client cpu | foreign cpu |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rec:
        if r["kind"] not in ("closed", "list", "c1"):
            continue
        st = r.get("stats", {})
        ratio = f"{r['vs_ceiling']:.2f}x" if r.get("vs_ceiling") else "-"
        lines.append(f"| {r['server']} | {r['mix']} | {r['per_request']} | {r['concurrency']} | {r['texts_s']:.1f} | "
                     f"{r['tokens_s']:.0f} | {r['req_s']:.1f} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} | "
                     f"{r['errors']} | {_f(st.get('mean_batch_size'))} | {_f(st.get('padding_ratio') and st['padding_ratio'] * 100)}% | "
                     f"{ratio} | {r.get('server_cpu', 0):.2f} | {r['client_cpu']:.2f} | {r.get('foreign_cpu', 0):.2f} |")
    lines.append("")
    lines.append("## Open loop, Poisson arrivals (latency from the scheduled arrival)")
    lines.append("| offered req/s | x batchd saturation | x ceiling | achieved texts/s | p50 ms | p90 ms | p99 ms | errors | status | mean batch | padding | foreign cpu |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in _find(rec, kind="open"):
        st = r.get("stats", {})
        lines.append(f"| {r['offered_rps']:.0f} | {r['fraction']:.2f} | {r['fraction_of_ceiling']:.2f} | {r['texts_s']:.1f} | {_f(r['p50_ms'])} | "
                     f"{_f(r['p90_ms'])} | {_f(r['p99_ms'])} | {r['errors']} | {json.dumps(r['status'])} | "
                     f"{_f(st.get('mean_batch_size'))} | {_f(st.get('padding_ratio') and st['padding_ratio'] * 100)}% | "
                     f"{r.get('foreign_cpu', 0):.2f} |")
    lines.append("")
    lines.append("## References")
    cc = _one(rec, kind="client_ceiling")
    if cc:
        lines.append(f"- client ceiling (canned-response server, c={cc['concurrency']}): {cc['req_s']:.0f} req/s, "
                     f"client cpu {cc['client_cpu']:.2f} core")
    for o in _find(rec, kind="overhead"):
        lines.append(f"- {o['server']} (c={o['concurrency']}, round {o['round']}): {o['req_s']:.0f} req/s, "
                     f"p50 {_f(o['p50_ms'])} ms, errors {o['errors']}")
    for r in _find(rec, kind="rss"):
        lines.append(f"- batchd RSS ({r['when']}): {_f(r.get('rss_mb'), '{:.0f}')} MB, peak {_f(r.get('peak_rss_mb'), '{:.0f}')} MB")
    lines.append("")
    lines.append("## Targets (ratios within this run)")
    lines.append("| target | value | goal | pass | foreign cpu | detail |")
    lines.append("|---|---|---|---|---|---|")
    for t in targets(rec):
        v, unit = t["value"], t["unit"]
        shown = "-" if v is None else (f"{v:.1%}" if unit == "%" else f"{v:+.2f} ms" if unit == "ms" else f"{v:.2f}x")
        ok = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        fc = t.get("foreign_cpu")
        noisy = fc is not None and fc > 0.25
        lines.append(f"| {t['target']} | {shown} | {t['goal']} | {ok}{' (noisy)' if noisy else ''} | "
                     f"{'-' if fc is None else f'{fc:.2f}'} | {t['detail']} |")
    lines.append("")
    lines.append("foreign cpu: the most cores other jobs on the machine used during the readings behind a target; "
                 "over 0.25 the target is marked noisy and should be measured again.")
    return "\n".join(lines)


def summarise(run: Run) -> None:
    text = tables(run)
    print(text, flush=True)
    (run.dir / "summary.md").write_text(text + "\n")
    (run.dir / "summary.json").write_text(json.dumps(targets(run.records), indent=1))
    run.emit({"kind": "targets", "targets": targets(run.records)})
    try:
        from .plots import plot

        path = plot(run.records, run.dir / "bench.png")
        run.log(f"plot -> {path}")
    except Exception as exc:  # a plotting problem must not lose the measured numbers
        run.log(f"plot failed: {exc!r}")
    run.log(f"results -> {run.jsonl}, {run.dir / 'summary.md'}")
