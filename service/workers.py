"""Several scorer processes on one port: `ctrserve serve --workers N`.

The parent binds the listening socket once and starts N worker processes (spawn: nothing of
the parent's state but the settings and the socket), each with its own app, batcher and
onnxruntime session, all accepting on the shared socket (the kernel spreads connections).
Before they start, the parent
- starts the embedded Redis when no REDIS_URL is set, and hands its URL to every worker (they
  would otherwise race to start one each);
- loads the feature tables (`--features`) once;
- points PROMETHEUS_MULTIPROC_DIR at a fresh directory, so /metrics from any worker reports
  the counters and histograms of all of them, exactly (service/metrics.py).
A worker that dies is started again. SIGTERM or SIGINT reaches every worker, which finishes its
in-flight requests and drains its queue (uvicorn's graceful shutdown); then the parent stops
the embedded Redis and removes the metrics directory. A parent that is killed takes its workers
with it (Linux's parent-death signal), as a one-process scorer's kill would.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.process import BaseProcess
from typing import Any

from ctrserve.service.settings import Settings

log = logging.getLogger("ctrserve.workers")
RESTART_POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(settings: Settings, sock: socket.socket, log_level: str, parent: int) -> None:
    from ctrserve.service.server import serve

    _die_with(parent)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    serve(settings, sock)


def _die_with(parent: int) -> None:
    """Be killed when the parent dies (Linux): a SIGKILLed scorer must not leave workers
    serving on its port, where a restarted one could not bind it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's exit is not watched
        return
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def serve_workers(settings: Settings, workers: int, log_level: str = "info") -> None:
    """Run `workers` scorer processes on one port until SIGTERM/SIGINT."""
    from ctrserve.service.redis_server import embedded_url, start_embedded, stop_embedded

    embedded = None
    if not settings.redis_url:
        embedded = start_embedded(settings.embedded_redis_db())
        settings = settings.model_copy(update={"redis_url": embedded_url(embedded)})
    if settings.load_features:  # once for all workers, not once each
        from ctrserve.service.app import load_features

        try:
            load_features(settings, settings.redis_url)
        except BaseException:
            if embedded is not None:
                stop_embedded(embedded)
            raise
        settings = settings.model_copy(update={"load_features": None})
    metrics_dir = tempfile.mkdtemp(prefix="ctrserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sock = bind(settings)
    context = multiprocessing.get_context("spawn")
    stopping: list[int] = []
    procs: list[BaseProcess] = []

    def start() -> BaseProcess:
        proc = context.Process(target=_worker, args=(settings, sock, log_level, os.getpid()),
                               name="ctrserve-worker")
        proc.start()
        return proc

    def stop(signum: int, _: Any) -> None:
        stopping.append(signum)
        for proc in procs:
            if proc.pid and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        procs.extend(start() for _ in range(workers))
        # always said, as uvicorn says its address: with --port 0 this is how one learns it
        print(f"ctrserve running on http://{settings.host}:{sock.getsockname()[1]} with "
              f"{workers} workers", file=sys.stderr, flush=True)
        _supervise(procs, start, stopping)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in procs:  # after a failed start: the others go too
            if proc.is_alive():
                proc.terminate()
            proc.join()
        sock.close()
        if embedded is not None:
            stop_embedded(embedded)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def _supervise(procs: list[BaseProcess], start: Any, stopping: list[int]) -> None:
    """Until a signal: restart a worker that exited; then wait for all of them."""
    from prometheus_client import multiprocess

    while not stopping:
        for i, proc in enumerate(procs):
            proc.join(RESTART_POLL_S / len(procs))
            if proc.exitcode is not None and not stopping:
                if proc.exitcode == 3:  # start-up failed: another try would fail the same way
                    raise SystemExit(3)
                log.warning("worker %d exited with %s; starting another", proc.pid,
                            proc.exitcode)
                multiprocess.mark_process_dead(proc.pid)
                procs[i] = start()
    for proc in procs:
        proc.join()
