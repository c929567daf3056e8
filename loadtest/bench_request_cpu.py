"""The scorer's own CPU per score request, inference and HTTP aside: what issue 13 asks to cut.

    python -m ctrserve.loadtest.bench_request_cpu --registry demo/registry [--bundle NAME]
        [--features demo/data] [--candidates 10,100,500] [--concurrency 16] [--requests 4000]
        [--rounds 3] [--out bench-out/request_cpu.json]

The real app (create_app, its lifespan: the embedded Redis loaded from the synth dir, the
bundle, the batcher) is driven in process through its ASGI entry with `--concurrency`
coroutines, so there is no HTTP and no load generator on the CPU. The event loop is uvloop, as
`ctrserve serve` runs it (`--loop asyncio` for the standard one, which costs more per Redis
round trip and task switch). Each batcher's onnxruntime
call is replaced by one that returns zeros of the right length: everything else a request does
runs (admission, body, parsing, the user read and the serve-log write to Redis, routing,
features and encoding, the batching queue, the signed token, the guardrail sums, metrics, the
reply). Reported per cell: CPU seconds of this process (all threads; the redis-server is
another process) per request, the best and the median of `--rounds` rounds, with inference on
the batcher's thread and on the event loop (`inference_thread`). The HTTP layer's own cost is
bench_http's; onnxruntime's is bench_serving's in-process limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from ctrserve.loadtest.bench_serving import make_bodies, newest_bundle, records
from ctrserve.service.app import create_app
from ctrserve.service.settings import Settings


def zeros(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.zeros(len(next(iter(feeds.values()))), np.float32)


async def post(app: Any, body: bytes) -> None:
    scope = {"type": "http", "method": "POST", "path": "/v1/score", "query_string": b"",
             "headers": [(b"content-length", b"%d" % len(body))]}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise SystemExit(f"the scorer answered {sent[0]['status']}: {sent[1]['body'][:300]}")


async def cell(settings: Settings, bodies: list[bytes], concurrency: int, requests: int,
               rounds: int) -> list[float]:
    """CPU ms per request of each round, after one warm round."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        for model in app.state.models.models.values():
            model.batcher._run = zeros  # inference aside: the rest of the request runs

        async def client(k: int, n: int) -> None:
            for i in range(n):
                await post(app, bodies[(k * 31 + i) % len(bodies)])

        per_round = []
        for r in range(rounds + 1):
            cpu = time.process_time()
            await asyncio.gather(*(client(k, requests // concurrency)
                                   for k in range(concurrency)))
            if r:  # the first round warms the caches
                per_round.append((time.process_time() - cpu) / requests * 1000)
    return per_round


def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = args.bundle or newest_bundle(args.registry, "deepfm")
    features = args.features or args.registry.parent / "data"
    users, apps = records(features)
    os.environ.pop("REDIS_URL", None)  # the embedded Redis, as the demo's scorer
    db = Path(tempfile.mkdtemp(prefix="bench-request-cpu-")) / "store.rdb"
    cells = []
    for n in args.candidates:
        bodies = [b.encode() for b in make_bodies(users, apps, n, 256)]
        for thread in (True, False):
            settings = Settings(registry=args.registry, bundle=bundle, load_features=features,
                                redis_db=db, inference_thread=thread, port=0)
            ms = run_loop(args.loop, cell(settings, bodies, args.concurrency, args.requests,
                                          args.rounds))
            cells.append({"candidates": n, "inference": "thread" if thread else "loop",
                          "cpu_ms_per_request_best": round(min(ms), 3),
                          "cpu_ms_per_request_median": round(statistics.median(ms), 3),
                          "rounds": [round(x, 3) for x in ms]})
            print(row(cells[-1]), file=sys.stderr, flush=True)
    return {"bundle": bundle, "loop": args.loop, "concurrency": args.concurrency,
            "requests": args.requests,
            "cores": os.cpu_count(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cells": cells}


def run_loop(loop: str, main: Coroutine[Any, Any, list[float]]) -> list[float]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


HEADER = f"{'cand':>5} {'inference':>9} {'best ms':>8} {'median ms':>10}"


def row(c: dict[str, Any]) -> str:
    return (f"{c['candidates']:>5} {c['inference']:>9} {c['cpu_ms_per_request_best']:>8.3f} "
            f"{c['cpu_ms_per_request_median']:>10.3f}")


def main(argv: list[str] | None = None) -> int:
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.bench_request_cpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, default=Path("demo/registry"))
    p.add_argument("--bundle")
    p.add_argument("--features", type=Path, help="synth dir (default: REGISTRY/../data)")
    p.add_argument("--candidates", type=ints, default=(10, 100, 500))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=4000, help="per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="the event loop (default: uvloop, as ctrserve serve)")
    p.add_argument("--out", type=Path, default=Path("bench-out/request_cpu.json"))
    args = p.parse_args(argv)
    print(HEADER, file=sys.stderr, flush=True)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
