"""The parent process of `server.workers = N > 1`.

It binds the listening socket once (or takes `fd://N`) and hands it to N front-end processes (each
accepts on it), starts one engine process listening on a Unix socket in a private temp dir, and
then only watches:
  - a front end that dies is started again (its in-flight requests are cancelled in the engine when
    its connection drops; their clients see the connection close);
  - an engine process that dies is not restarted: every front end answers 503 engine_dead and
    /health is 503, as a one-process server does when its model worker dies;
  - SIGTERM/SIGINT go to every child: the engine drains (new requests 503 shutting_down, accepted
    ones finish within server.drain_timeout_s), then tells the front ends, which finish writing and
    exit; the supervisor exits 0 when every child did.
It never touches the model, the event loop or a request.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgspec

from ..config import Config

log = logging.getLogger("batchd.supervisor")
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)  # a front end that keeps dying is restarted ever more slowly
STABLE_AFTER_S = 10.0  # a front end that lived this long starts the backoff again
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGTERM (and drain) if the supervisor is killed outright."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def listen(bind: str) -> int:
    """The listening socket's fd: `fd://N` as given, `unix:PATH`, or `HOST:PORT`."""
    if bind.startswith("fd://"):
        fd = int(bind[5:])
        os.set_inheritable(fd, True)
        return fd
    if bind.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(bind[5:])
    else:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        log.info("listening on %s:%d", host, sock.getsockname()[1])
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock.detach()


class _Child:
    def __init__(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        self.name, self.argv, self.pass_fds = name, argv, pass_fds
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, pass_fds=self.pass_fds, preexec_fn=_die_with_parent)
        self.started = time.monotonic()

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else 0

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def supervise(config: Config, bind: str) -> int:
    workdir = tempfile.mkdtemp(prefix="batchd-")
    os.environ.setdefault("BATCHD_LOG_LEVEL", logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    try:
        return _Supervisor(config, bind, workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _Supervisor:
    def __init__(self, config: Config, bind: str, workdir: str) -> None:
        self.config = config
        config_path = os.path.join(workdir, "config.json")
        with open(config_path, "wb") as f:
            f.write(msgspec.json.encode(config))
        socket_path = os.path.join(workdir, "engine.sock")
        fd = listen(bind)
        py = sys.executable
        self.engine = _Child("engine", [py, "-m", "batchd.frontend.engine_server", config_path, socket_path])
        self.fronts = [_Child(f"front-end {i}", [py, "-m", "batchd.frontend.worker", config_path, socket_path,
                                                 str(fd)], (fd,))
                       for i in range(config.server.workers)]
        self.stopping = False
        self.engine_dead_logged = False

    def _on_signal(self, signum: int, frame) -> None:
        """Forwarded at once (not at the next poll): the engine starts refusing new work within a
        millisecond or so of the signal, as a one-process server does."""
        if not self.stopping:
            self.stopping = True
            for child in (self.engine, *self.fronts):
                child.signal(signal.SIGTERM)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.engine.start()
            for front in self.fronts:
                front.start()
            log.info("engine process %d, front ends %s", self.engine.proc.pid,  # type: ignore[union-attr]
                     [f.proc.pid for f in self.fronts])  # type: ignore[union-attr]
            while not self.stopping:
                self._watch()
                time.sleep(0.05)
            return self._shut_down()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> None:
        if self.engine.exited() is not None and not self.engine_dead_logged:
            self.engine_dead_logged = True
            log.error("the engine process exited (%s): front ends answer 503 engine_dead", self.engine.exited())
        now = time.monotonic()
        for front in self.fronts:
            code = front.exited()
            if code is None:
                continue
            if now - front.started > STABLE_AFTER_S:
                front.restarts = 0
            wait = RESTART_BACKOFF_S[min(front.restarts, len(RESTART_BACKOFF_S) - 1)]
            if now - front.started < wait:
                continue
            log.warning("%s (pid %d) exited with %s: starting it again", front.name, front.proc.pid, code)  # type: ignore[union-attr]
            front.restarts += 1
            front.start()

    def _shut_down(self) -> int:
        log.info("stopping: the engine drains, then the front ends exit")
        children = [self.engine, *self.fronts]
        for child in children:
            child.signal(signal.SIGTERM)
        give_up = time.monotonic() + self.config.server.drain_timeout_s + 15.0
        while any(c.exited() is None for c in children) and time.monotonic() < give_up:
            time.sleep(0.05)
        for child in children:
            if child.exited() is None:
                log.error("%s did not stop in time: killing it", child.name)
                child.signal(signal.SIGKILL)
                child.proc.wait()  # type: ignore[union-attr]
        codes = {c.name: c.exited() for c in children}
        if any(codes.values()):
            log.error("exit codes: %s", codes)
            return 1
        return 0
