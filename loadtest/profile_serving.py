"""Where the scorer's time goes: py-spy samples a scorer under wrk load, by function.

    python -m ctrserve.loadtest.profile_serving --registry demo/registry --features demo/data \\
        [--candidates 10 --concurrency 64 --seconds 15 --batching on] [--out bench-out/profile]

Starts one scorer (as loadtest/bench_serving.py does), drives it with wrk, and records it with
`py-spy record --nonblocking --threads --format raw` (Python frames; it does not
pause the scorer) (py-spy must be on PATH, or --py-spy PATH; it
is a profiling tool, not a dependency). Writes the collapsed stacks and a JSON summary, and
prints the share of samples per category (HTTP/uvicorn, request parsing and validation,
features and encoding, Redis, batching queue, onnxruntime, response, the event loop) and the
top functions by self time. Only samples on the CPU count (py-spy's default: no idle waits),
from every thread, so onnxruntime's worker thread shows beside the event loop's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ctrserve.loadtest.bench_serving import (
    WRK_SCRIPT,
    Server,
    make_bodies,
    newest_bundle,
    records,
)

# first match wins, tested against the whole stack (outermost first) of a sample
CATEGORIES = (
    ("onnxruntime", ("InferenceSession.run", "onnxruntime")),
    ("batching queue", ("service/batcher.py",)),
    ("features + encoding", ("service/encoding.py", "service/item_rows.py", "features/",
                             "service/feature_store.py", "service/plan.py")),
    ("redis", ("redis/", "hiredis")),
    ("request parsing + validation", ("model_validate_json", "service/schemas.py")),
    ("response", ("to_json", "service/routers/score.py")),
    ("attribution + counts", ("service/attribution.py",)),
    # the scorer's own code: before http, as every request's stack passes through uvicorn
    # (these samples were once counted as HTTP); not the score endpoint and the app, the
    # outer frames through which uvicorn's own send is also called
    ("scorer's request path", ("service/scoring.py", "service/serve_log.py",
                               "service/metrics.py", "service/admission.py",
                               "service/experiments/", "service/counts.py")),
    ("http (uvicorn/starlette)", ("uvicorn", "starlette", "httptools", "h11")),
    ("event loop (asyncio, selectors)", ("asyncio/", "selectors.py")),
)


# the leaf frame of a sample taken in the event loop's own native code (uvloop's loop, without
# --native py-spy sees no C frames): socket reads and writes for HTTP and Redis alike,
# httptools' parsing, callback dispatch, the wake-ups from the batcher's thread
LOOP_NATIVE = ("Runner.run (asyncio/runners.py", "run (uvloop/")


def categorize(stack: str) -> str:
    if stack.rsplit(";", 1)[-1].startswith(LOOP_NATIVE):
        return "loop native: sockets, parsing"
    for name, needles in CATEGORIES:
        if any(n in stack for n in needles):
            return name
    return "other"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    by_category: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        by_category[categorize(stack)] += n
        by_function[stack.split(";")[-1]] += n
    share = {k: round(v / total, 4) for k, v in by_category.most_common()}
    functions = [{"function": f, "share": round(v / total, 4)}
                 for f, v in by_function.most_common(top)]
    return {"samples": total, "categories": share, "top_self": functions}


def run(args: argparse.Namespace) -> dict[str, Any]:
    registry, features = Path(args.registry), Path(args.features)
    bundle = args.bundle or newest_bundle(registry, "deepfm")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-"))
    users, apps = records(features)
    bodies = work / "bodies.jsonl"
    bodies.write_text("\n".join(make_bodies(users, apps, args.candidates, 256)) + "\n")
    extra = [] if args.batching == "on" else ["--no-batching"]
    server = Server("profiled", registry, bundle, features, work, extra)
    try:
        server.wait_ready()
        script = work / "bench.lua"
        script.write_text(WRK_SCRIPT)
        wrk = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.concurrency}", f"-d{args.seconds + 4}s", "--timeout",
             "10s", "-s", str(script), server.url], stdout=subprocess.PIPE, text=True,
            env={"BENCH_BODIES": str(bodies), "PATH": "/usr/bin:/bin"})
        time.sleep(2)  # warm, then sample the steady state
        name = f"c{args.candidates}-x{args.concurrency}-batching-{args.batching}"
        raw = out / f"{name}.txt"
        subprocess.run([args.py_spy, "record", "--pid", str(server.proc.pid), "--nonblocking",
                        "--threads", "--format", "raw", "--rate", "200",
                        "--duration", str(args.seconds), "--output", str(raw)],
                       check=True, capture_output=True)
        load = json.loads(wrk.communicate()[0].strip().splitlines()[-1])
    finally:
        server.stop()
    result = {"bundle": bundle, "candidates": args.candidates,
              "concurrency": args.concurrency, "batching": args.batching,
              "requests_per_s": round(load["requests"] / load["seconds"], 1),
              "p99_ms": load["p99_ms"], **summarize(raw)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['candidates']} candidates x {result['concurrency']} clients, batching "
             f"{result['batching']}: {result['requests_per_s']} requests/s, p99 "
             f"{result['p99_ms']:.1f} ms, {result['samples']} samples (all threads)",
             f"{'where':<32}{'share':>8}"]
    lines += [f"{k:<32}{v:>8.1%}" for k, v in result["categories"].items()]
    lines.append("top functions by self time:")
    lines += [f"  {f['share']:>6.1%}  {f['function'][:110]}" for f in result["top_self"][:15]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", required=True)
    p.add_argument("--features", required=True, help="the synthetic world (users, apps)")
    p.add_argument("--bundle")
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--batching", choices=("on", "off"), default="on")
    p.add_argument("--py-spy", default="py-spy")
    p.add_argument("--out", default="bench-out/profile")
    args = p.parse_args(argv)
    print(table(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
