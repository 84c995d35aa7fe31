"""The summary of one generation run: summary.md (and stdout), summary.json (the ratios)."""
from __future__ import annotations

import json

ORDER = ("generate", "static", "manager", "batchd")


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _rank(rec: dict) -> tuple:
    name = rec["system"].split("-")[0]
    return (rec["mode"] != "closed", ORDER.index(name) if name in ORDER else 9)


def ratios(records: list[dict]) -> list[dict]:
    phases = {(r["system"], r["mode"]): r for r in records if r["kind"] == "phase"}
    static = next((s for s, m in phases if s.startswith("static-") and m == "closed"), "static-8")
    out = []

    def add(a: str, b: str, mode: str, metric: str = "tokens_s") -> None:
        ra, rb = phases.get((a, mode)), phases.get((b, mode))
        va, vb = (ra or {}).get(metric), (rb or {}).get(metric)
        out.append({"ratio": f"{a} / {b}", "mode": mode, "metric": metric,
                    "value": va / vb if va is not None and vb else None, "a": va, "b": vb,
                    "foreign_cpu": max([x.get("foreign_cpu") or 0.0 for x in (ra, rb) if x] or [0.0])})

    for a, b in (("batchd", "manager"), ("batchd", static), ("manager", static), (static, "generate"),
                 ("manager", "generate")):
        add(a, b, "closed")
    add("batchd", "manager", "open")
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms"):
        add("batchd", "manager", "open", metric)
    return out


def write_summary(run, records: list[dict]) -> str:
    lines = []
    meta = next((r for r in records if r["kind"] == "meta"), {})
    w = next((r for r in records if r["kind"] == "workload"), None)
    opts = meta.get("options", {})
    lines.append(f"# Generation benchmark ({meta.get('profile')}, {opts.get('dtype')}, SmolLM2-135M-Instruct, "
                 f"{meta.get('cpus')} CPUs)\n")
    if w:
        lines.append(f"Workload: {w['requests']} chat requests, prompts {w['prompt_tokens_min']}-{w['prompt_tokens_max']} "
                     f"tokens (p50 {w['prompt_tokens_p50']}), max_tokens {w['max_tokens_min']}-{w['max_tokens_max']} "
                     f"(sum {w['max_tokens_sum']}), every request decodes its full length, greedy.\n")
    open_loop = next((r for r in records if r["kind"] == "open_loop"), None)
    lines.append("| system | loop | ok/requests | tokens | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
                 "ITL p99 ms | TPOT p50 ms | greedy != generate() | foreign cpu |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in records if r["kind"] == "phase"), key=_rank):
        g = r.get("greedy_vs_generate")
        gtxt = f"{g['differ']}/{g['compared']}" if g else "(reference)" if r["system"] == "generate" else "-"
        loop = r["mode"] + (f" {r['rate']:.2f}/s" if r.get("rate") else "")
        lines.append(f"| {r['system']} | {loop} | {r['ok']}/{r['requests']} | {r['tokens']} | {_f(r.get('tokens_s'))} | "
                     f"{_ms(r.get('ttft_p50_ms'))} | {_ms(r.get('ttft_p99_ms'))} | {_ms(r.get('itl_p50_ms'))} | "
                     f"{_ms(r.get('itl_p99_ms'))} | {_ms(r.get('tpot_p50_ms'))} | {gtxt} | {_f(r.get('foreign_cpu'), 2)} |")
    rs = ratios(records)
    lines.append("\n| ratio | loop | metric | value | a | b | foreign cpu (max) |")
    lines.append("|---|---|---|---|---|---|---|")
    for x in rs:
        if x["value"] is None:  # a system this run did not measure
            continue
        fmt = (lambda v: _f(v)) if x["metric"] == "tokens_s" else _ms
        lines.append(f"| {x['ratio']} | {x['mode']} | {x['metric']} | {_f(x['value'], 2)}{'x' if x['value'] is not None else ''} | {fmt(x['a'])} | "
                     f"{fmt(x['b'])} | {_f(x['foreign_cpu'], 2)} |")
    notes = []
    if open_loop:
        notes.append(f"Open loop: {open_loop['requests']} Poisson arrivals at {open_loop['rate']:.3f} req/s "
                     f"({open_loop['how']}), the same arrival times for every system; TTFT counts from the "
                     f"scheduled arrival.")
    for r in records:
        if r["kind"] == "manager_config":
            notes.append("Manager sizes: " + ", ".join(f"{k}={r[k]}" for k in (
                "max_requests_per_batch", "max_batch_tokens", "page_size", "num_blocks", "allow_block_sharing", "attn")))
        elif r["kind"] == "dtype_pass":
            notes.append(f"{r['dtype']} vs {r['reference_dtype']}: {r['differ']} of {r['compared']} greedy generate() "
                         f"outputs differ (median first differing token "
                         f"{_f(r['agreement'].get('first_diff_median'), 0)}); generate() {_f(r['tokens_s'])} vs "
                         f"{_f(r['reference_tokens_s'])} tok/s of service time = {_f(r['speed_ratio'], 2)}x "
                         f"(each request in both dtypes back to back; foreign cpu {r.get('foreign_cpu')})")
        elif r["kind"] == "cancel_probe":
            notes.append(f"Manager cancel probe: A cancelled after {r['a_tokens_at_cancel']} tokens delivered "
                         f"{r['a_outputs_after_cancel']} more output(s) (last at {r['a_tokens_after_cancel']} tokens), "
                         f"final output delivered: {r['a_final_output_delivered']}, still scheduled: "
                         f"{r['a_still_scheduled']}; B finished {r['b_tokens']} tokens")
        elif r["kind"] == "client_ceiling":
            notes.append(f"Client ceiling (canned SSE server, no model): {_f(r['tokens_s'], 0)} chunks/s at client cpu "
                         f"{r['client_cpu']}")
        elif r["kind"] == "batchd_skipped":
            notes.append(f"batchd skipped: {r['reason'][-300:]}")
        elif r["kind"] == "batchd_probe" and r["record"].get("error"):
            notes.append(f"batchd skipped: probe failed: {r['record']['error'][:300]}")
        elif r["kind"] == "phase" and r.get("contract"):
            notes.append(f"batchd {r['mode']}: stream deviations from the OpenAI format: {r['contract']}")
        if r["kind"] == "phase" and r["system"] == "batchd" and r.get("server_stats"):
            lat = (r["server_stats"].get("latency_ms") or {})

            def p(name: str, q: str, lat: dict = lat) -> str:
                return _ms((lat.get(name) or {}).get(q))

            notes.append(f"batchd {r['mode']}, its own /stats: TTFT p50/p99 {p('time_to_first_token', 'p50')}/"
                         f"{p('time_to_first_token', 'p99')} ms, inter-token p99 {p('inter_token', 'p99')} ms, "
                         f"model step p50/p99 {p('model_time', 'p50')}/{p('model_time', 'p99')} ms, mean batch "
                         f"{_f(r['server_stats'].get('mean_batch_size'))}, chunks per token "
                         f"{_f(r.get('chunks_per_token'), 2)}, client cpu {r.get('client_cpu')}, server cpu "
                         f"{r.get('server_cpu')}")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    lines.append("\nTTFT: arrival to first token (closed loop: all arrive at t=0, so queueing behind earlier work "
                 "counts). ITL: every gap between consecutive tokens (offline) / content chunks (batchd), pooled. "
                 "tokens/s: the requests' own generated tokens / (first arrival to last token).")
    text = "\n".join(lines) + "\n"
    (run.dir / "summary.md").write_text(text)
    (run.dir / "summary.json").write_text(json.dumps({"ratios": rs}, indent=1))
    print(text)
    return text
