"""Shared plumbing: the results folder, JSON-lines output, progress lines, CPU layout, request-body
files, and running the load generator / ceiling as their own processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .servers import ROOT, Server
from .workload import Workload

RESULTS = ROOT / "benchmarks" / "results"


class CpuLayout:
    """Where processes run. On a shared 2-core machine the model needs every core for a meaningful
    ceiling, so by default ("shared") the servers and the ceiling get all CPUs and only the client
    is pinned (to the last CPU); the client's CPU share is reported per point so its cost is visible.
    "split" gives the servers and the ceiling CPUs[:-1] (torch_threads to match) and the client the
    last CPU alone: no interference, but a smaller model."""

    def __init__(self, mode: str) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.mode = mode
        self.client = [cpus[-1]]
        if mode == "split" and len(cpus) > 1:
            self.server: list[int] | None = cpus[:-1]
            self.overrides = [f"model.torch_threads={len(cpus) - 1}"]
        else:
            self.server = None
            self.overrides = []

    def describe(self) -> dict:
        return {"layout": self.mode, "cpus": sorted(os.sched_getaffinity(0)), "client_cpus": self.client,
                "server_cpus": self.server or "all", "extra_overrides": self.overrides}


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / _TICK  # minus idle and iowait


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (`server.workers > 1`: the supervisor's
    front ends and engine process)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(f[11]) + int(f[12])) / _TICK  # utime + stime, all threads
    except (OSError, IndexError):
        return 0.0
    return total + sum(_proc_cpu_s(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    return out


class CpuMeter:
    """Who used the CPUs during a measurement: the process under test, the load generator, and
    everything else on the machine ("foreign": other people's jobs). Foreign load is why readings on a
    shared machine move; it is reported per point so a noisy point can be recognised."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t, self.busy, self.cpu, self.own = time.monotonic(), _busy_s(), _proc_cpu_s(pid), time.process_time()

    def stop(self, client_cpu_s: float = 0.0) -> dict:
        wall = max(1e-9, time.monotonic() - self.t)
        busy = _busy_s() - self.busy
        cpu = _proc_cpu_s(self.pid) - self.cpu
        own = time.process_time() - self.own
        return {"server_cpu": round(cpu / wall, 2),
                "foreign_cpu": round(max(0.0, busy - cpu - client_cpu_s - own) / wall, 2)}


class Run:
    def __init__(self, name: str, layout: CpuLayout, out_dir: Path | None = None) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.dir = out_dir or RESULTS / f"{name}-{stamp}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "results.jsonl"
        self.layout = layout
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        self._bodies: dict[tuple, Path] = {}

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.25) -> tuple[float, float]:
        """Before a measurement: wait (at most max_wait_s) until the machine is quiet, i.e. other jobs
        use at most `threshold` cores (our own servers are idle between points). Returns (waited s,
        last load in cores)."""
        t = time.monotonic()
        while True:
            b0 = _busy_s()
            time.sleep(0.5)
            load = (_busy_s() - b0) / 0.5
            waited = time.monotonic() - t
            if load <= threshold or waited >= max_wait_s:
                return waited, load

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def emit(self, record: dict) -> dict:
        record = {"t": round(time.monotonic() - self.t0, 2), **record}
        self.records.append(record)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    # ---- request bodies -------------------------------------------------------------------------
    def bodies(self, work: Workload, per_request: int = 1, model: str | None = None,
               only: list[int] | None = None) -> Path:
        """A JSON-lines file of pre-made request bodies: N consecutive texts per request."""
        key = (work.name, per_request, model, tuple(only or ()))
        if key not in self._bodies:
            idx = only if only is not None else list(range(len(work.texts)))
            path = self.dir / f"bodies-{work.name}-n{per_request}{'-only' if only else ''}.jsonl"
            with path.open("w") as f:
                for i in range(0, len(idx) - per_request + 1, per_request):
                    chunk = idx[i:i + per_request]
                    texts = [work.texts[j] for j in chunk]
                    body = {"input": texts[0] if per_request == 1 else texts}
                    if model:
                        body["model"] = model
                    f.write(json.dumps({"body": json.dumps(body), "texts": len(chunk),
                                        "tokens": sum(work.tokens[j] for j in chunk)}) + "\n")
            self._bodies[key] = path
        return self._bodies[key]

    # ---- subprocesses ---------------------------------------------------------------------------
    def _subprocess_json(self, module: str, spec: dict, timeout: float) -> dict:
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=self.dir, delete=False) as f:
            json.dump(spec, f)
        try:
            proc = subprocess.run([sys.executable, "-m", module, f.name], cwd=ROOT, capture_output=True,
                                  text=True, timeout=timeout)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed: {proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def load(self, server: Server, bodies: Path, mode: str = "closed", concurrency: int = 1,
             rate: float = 0.0, duration_s: float = 5.0, warmup_s: float = 1.0, max_requests: int = 200_000,
             timeout_s: float = 60.0, drain_s: float = 40.0, offset: int = 0, seed: int = 1) -> dict:
        spec = {"host": server.host, "port": server.port, "bodies": str(bodies), "mode": mode,
                "concurrency": concurrency, "rate": rate, "duration_s": duration_s, "warmup_s": warmup_s,
                "max_requests": max_requests, "timeout_s": timeout_s, "drain_s": drain_s, "offset": offset,
                "seed": seed, "cpus": self.layout.client, "max_connections": 1024}
        meter = CpuMeter(server.proc.pid)
        t = time.monotonic()
        out = self._subprocess_json("benchmarks.loadgen", spec, timeout=duration_s + drain_s + 60)
        # the loadgen's start-up (python import) is outside its own clock; close enough for a share
        return {**out, **meter.stop(out["client_cpu"] * (time.monotonic() - t))}

    def ceiling(self, config: str, overrides: list[str]) -> "CeilingWorker":
        spec = {"config": str(ROOT / config), "overrides": overrides + self.layout.overrides,
                "cpus": self.layout.server}
        path = self.dir / f"ceiling-{len(list(self.dir.glob('ceiling-*.json')))}.json"
        path.write_text(json.dumps(spec))
        return CeilingWorker(path)


class CeilingWorker:
    """The offline-ceiling process (benchmarks/ceiling.py), loaded once, asked for readings on demand."""

    def __init__(self, spec_path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ceiling", str(spec_path)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ready: dict | None = None
        self._sent: set[str] = set()

    def wait_ready(self) -> dict:
        if self._ready is None:
            self._ready = self._read()
        return self._ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"ceiling worker exited with {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, cmd: dict) -> dict:
        self.wait_ready()
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def mix(self, work: Workload, duration_s: float, max_batch_tokens: int | None = None,
            max_batch_size: int | None = None) -> dict:
        """texts/s of the model on this mix, sorted token-budgeted batches, about duration_s long."""
        texts = None if work.name in self._sent else work.texts
        self._sent.add(work.name)
        meter = CpuMeter(self.proc.pid)
        out = self._ask({"cmd": "mix", "name": work.name, "texts": texts, "duration_s": duration_s,
                          "max_batch_tokens": max_batch_tokens, "max_batch_size": max_batch_size})
        return {**out, **meter.stop()}

    def batch1(self, texts: list[str], duration_s: float) -> dict:
        return self._ask({"cmd": "batch1", "texts": texts, "duration_s": duration_s})["batch1"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_idle(server: Server, timeout: float = 60.0) -> float:
    """Let a server finish its queue (after an open-loop point past saturation); bounded."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        s = server.stats()
        if not s or (s.get("queue_depth", 0) == 0 and s.get("inflight_batches", 0) == 0):
            break
        time.sleep(0.1)
    return time.monotonic() - t
