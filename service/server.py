"""Run the scorer under uvicorn (one worker: uvloop + httptools, no access log)."""

from __future__ import annotations

import importlib.util
import socket

import uvicorn

from service.app import create_app
from service.settings import Settings


def uvicorn_config(settings: Settings, log_level: str = "info") -> uvicorn.Config:
    fast_loop = importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    return uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port,
        loop="uvloop" if fast_loop else "asyncio", http="httptools" if fast_http else "h11",
        access_log=False, proxy_headers=False, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then finish in-flight requests and drain the queues."""
    server = uvicorn.Server(uvicorn_config(settings))
    server.run(sockets=[sock] if sock else None)
    if server.started is False:
        raise SystemExit(3)  # start-up failed; uvicorn has logged why
