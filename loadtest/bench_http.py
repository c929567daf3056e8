"""What the HTTP layer alone costs: uvicorn (the scorer's server) against the floor beneath it.

    python -m ctrserve.loadtest.bench_http [--duration 6] [--connections 16]
        [--out bench-out/http.json]

Each server answers every POST with the same JSON reply of a 100-candidate score response's
size (2 KB body in, 2 KB out), no scoring: what is left is HTTP parsing, the ASGI hand-off and
the socket writes. Servers, one process each, driven by wrk on loopback in turn:
- `uvicorn`: uvicorn with uvloop and httptools and a bare ASGI app, as `ctrserve serve` runs;
- `httptools`: an asyncio protocol on uvloop calling httptools' parser directly, with no ASGI
  (the least a Python server can do per request);
- `granian`: granian's ASGI server, only where it is installed (not a dependency).
Reports requests/s and the server's CPU per request in µs (user + system of its process),
to compare with the scorer's whole CPU per request (bench_workers' `other` column).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPLY = b'{"pad":"' + b"x" * 2000 + b'"}'
BODY = b'{"pad":"' + b"y" * 2000 + b'"}'

ASGI_APP = f"""
REPLY = {REPLY!r}
HEAD = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(REPLY))]

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({{"type": "lifespan.startup.complete"}})
        await send({{"type": "lifespan.shutdown.complete"}})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({{"type": "http.response.start", "status": 200, "headers": HEAD}})
    await send({{"type": "http.response.body", "body": REPLY}})
"""

RAW_SERVER = f"""
import asyncio, sys, httptools, uvloop
REPLY = {REPLY!r}
HEAD = b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: %d\\r\\n\\r\\n"
WHOLE = HEAD % len(REPLY) + REPLY

class Protocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.transport.write(WHOLE)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Protocol, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

uvloop.run(main())
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BENCH_BODY")); wrk.body = f:read("*a"); f:close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(work: Path, port: int) -> dict[str, list[str]]:
    (work / "asgi_app.py").write_text(ASGI_APP)
    (work / "raw_server.py").write_text(RAW_SERVER)
    py = sys.executable
    found = {"uvicorn": [py, "-m", "uvicorn", "asgi_app:app", "--port", str(port), "--loop",
                         "uvloop", "--http", "httptools", "--no-access-log", "--log-level",
                         "warning"],
             "httptools": [py, "raw_server.py", str(port)]}
    if importlib.util.find_spec("granian") is not None:
        found["granian"] = [py, "-m", "granian", "--interface", "asgi", "--port", str(port),
                            "--workers", "1", "--no-ws", "--log-level", "warning",
                            "asgi_app:app"]
    return found


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout_s} s")


def cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def measure(name: str, cmd: list[str], port: int, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        wrk = ["wrk", "-t1", f"-c{args.connections}", "-s", str(work / "post.lua"),
               f"http://127.0.0.1:{port}/v1/score"]
        env = {**os.environ, "BENCH_BODY": str(work / "body.json")}
        subprocess.run([*wrk, "-d1s"], env=env, capture_output=True, check=True)  # warm
        cpu0 = cpu_seconds(proc.pid)
        out = subprocess.run([*wrk, f"-d{args.duration:g}s"], env=env, capture_output=True,
                             text=True, check=True).stdout
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    requests = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
    return {"server": name, "requests_per_s": round(requests / args.duration),
            "server_cpu_us_per_request": round(cpu / requests * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_http",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench-out/http.json"))
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (Debian: apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    (work / "body.json").write_bytes(BODY)
    (work / "post.lua").write_text(WRK_SCRIPT)
    port = free_port()
    rows = [measure(name, cmd, port, args, work) for name, cmd in commands(work, port).items()]
    print(f"{'server':<10} {'req/s':>8} {'server CPU us/request':>22}")
    for r in rows:
        print(f"{r['server']:<10} {r['requests_per_s']:>8,} {r['server_cpu_us_per_request']:>22}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
                                    "connections": args.connections, "cores": os.cpu_count(),
                                    "servers": rows}, indent=1))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
