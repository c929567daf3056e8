"""The benchmark suite: the scorer against its in-process limit, training against the peers.

    python -m ctrserve.loadtest.suite --registry demo/registry [--features demo/data] [--quick]
        [--parts serving,overload,workers,training] [--out bench-out/suite]
        [--readme docs/benchmarks.md] [--render-only]

Runs loadtest/bench_serving.py (OUT/serving.json), loadtest/bench_overload.py
(OUT/overload.json: open loop past saturation, admission on and off), loadtest/bench_workers.py
(OUT/workers.json: 1 worker process against the default, one per core, with the ratios to
the all-core and the one-thread in-process limits) and loadtest/bench_training.py
(OUT/training/results.json; it needs $CTR_DATA_DIR, and the peers' environment from
loadtest/peers/setup.sh for FuxiCTR and DeepCTR-Torch), then writes OUT/suite.json (the results
and their targets) and OUT/suite.md (their tables). `--readme FILE` puts
suite.md, with the command that made it, between the `<!-- suite:begin -->` and
`<!-- suite:end -->` lines of FILE: docs/benchmarks.md's performance figures come from here.
`--render-only` rebuilds suite.md (and that block) from the JSON files of an earlier run.
`--quick` only checks that the commands work (short cells, one seed, a few thousand rows); its
figures mean nothing, so it refuses `--readme`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ctrserve.loadtest import bench_overload, bench_serving, bench_training, bench_workers

BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
PARTS = ("serving", "overload", "workers", "training")
TITLES = {"serving": "Serving: the scorer against the in-process limit",
          "overload": "Overload: open loop at 1.5x, 2x and 3x of saturation",
          "workers": "Workers: one scorer process against the default (one per core) on one port",
          "training": "Training: ctrserve against FuxiCTR and DeepCTR-Torch"}


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    return _run_bench(bench_serving, args, "serving.json")


def run_overload(args: argparse.Namespace) -> dict[str, Any]:
    return _run_bench(bench_overload, args, "overload.json")


def run_workers(args: argparse.Namespace) -> dict[str, Any]:
    return _run_bench(bench_workers, args, "workers.json")


def _run_bench(bench: Any, args: argparse.Namespace, name: str) -> dict[str, Any]:
    argv = ["--registry", str(args.registry), "--out", str(args.out / name)]
    argv += ["--features", str(args.features)] if args.features else []
    argv += ["--quick"] if args.quick else []
    bench_args = bench.parse_args(argv)
    result = bench.run(bench_args)
    bench_serving.write_result(result, bench_args.out)
    return result


def run_training(args: argparse.Namespace) -> dict[str, Any] | str:
    """The training benchmark's result, or why it did not run."""
    if not args.data_dir:
        return "no real click logs: set CTR_DATA_DIR (or --data-dir) to the shared datasets"
    argv = ["--data-dir", str(args.data_dir), "--out", str(args.out / "training"),
            "--peers-python", str(args.peers_python)]
    argv += ["--quick"] if args.quick else []
    return bench_training.run(bench_training.parse_args(argv))


def load_parts(out: Path) -> dict[str, Any]:
    """The results an earlier run left in OUT (--render-only)."""
    parts: dict[str, Any] = {}
    for name, path in (("serving", out / "serving.json"), ("overload", out / "overload.json"),
                       ("workers", out / "workers.json"),
                       ("training", out / "training" / "results.json")):
        parts[name] = (json.loads(path.read_text()) if path.is_file()
                       else f"no result at {path}")
    return parts


def targets(parts: dict[str, Any]) -> dict[str, Any]:
    """Every target in one place: serving's, overload's and training's (per dataset)."""
    return {name: part["targets"] for name, part in parts.items()
            if isinstance(part, dict) and "targets" in part}


def markdown(parts: dict[str, Any], command: str) -> str:
    lines = [f"Produced by `{command}`.", ""]
    for name, title in TITLES.items():
        part = parts.get(name)
        lines.append(f"#### {title}")
        lines.append("")
        if isinstance(part, str):
            lines.append(f"Not run: {part}.")
        elif part is None:
            lines.append("Not run: not among --parts.")
        else:
            if made := part.get("created_at"):
                lines += [f"Measured {made[:10]}.", ""]
            lines.append(part["table"] if name == "training" else MARKDOWN[name](part))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


MARKDOWN = {"serving": bench_serving.markdown, "overload": bench_overload.markdown,
            "workers": bench_workers.markdown}


def write_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one {BEGIN} line before one {END} line")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ctrserve.loadtest.suite",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", type=Path, help="registry with a deepfm bundle (serving)")
    p.add_argument("--features", type=Path, help="synth dir (default: REGISTRY/../data)")
    p.add_argument("--data-dir", default=os.environ.get("CTR_DATA_DIR"),
                   help="folder holding movielens-100k/ and frappe/ (default $CTR_DATA_DIR)")
    p.add_argument("--peers-python", type=Path, default=bench_training.DEFAULT_PEERS_PYTHON,
                   help="python of the peers' environment (loadtest/peers/setup.sh)")
    p.add_argument("--parts", type=_parts, default=PARTS, help=",".join(PARTS))
    p.add_argument("--quick", action="store_true", help="smoke run: the figures mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench-out/suite"))
    p.add_argument("--readme", type=Path, help="rewrite this file's suite block")
    p.add_argument("--render-only", action="store_true",
                   help="no benchmark: tables from the JSON files already in --out")
    args = p.parse_args(argv)
    if args.quick and args.readme:
        p.error("--readme takes measured figures; --quick runs are smoke tests only")
    scoring = {"serving", "overload", "workers"} & set(args.parts)
    if scoring and not args.registry and not args.render_only:
        p.error(f"--registry is required for {', '.join(sorted(scoring))} "
                "(make demo writes demo/registry)")
    return args


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names or set(names) - set(PARTS):
        raise argparse.ArgumentTypeError(f"expected names from {PARTS}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = "python -m ctrserve.loadtest.suite " + args_text
    args.out.mkdir(parents=True, exist_ok=True)
    started, seconds = time.time(), None
    if args.render_only:
        parts = {k: v for k, v in load_parts(args.out).items() if k in args.parts}
        earlier = args.out / "suite.json"
        if earlier.is_file():  # the block names the command that measured, not this one
            measured = json.loads(earlier.read_text())
            command, seconds = measured["command"], measured.get("seconds")
    else:
        parts = {}
        runners = {"serving": run_serving, "overload": run_overload, "workers": run_workers,
                   "training": run_training}
        parts = {name: runners[name](args) for name in PARTS if name in args.parts}
    block = markdown(parts, command)
    seconds = seconds if seconds is not None else round(time.time() - started)
    suite = {"command": command, "quick": args.quick, "seconds": seconds,
             "targets": targets(parts), **parts}
    (args.out / "suite.json").write_text(json.dumps(suite, indent=1, default=str) + "\n")
    (args.out / "suite.md").write_text(block)
    if args.readme:
        write_readme(args.readme, block)
    print(block)
    failed = isinstance(parts.get("training"), dict) and parts["training"]["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
