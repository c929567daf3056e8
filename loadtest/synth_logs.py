"""Write impression logs drawn from the synthetic world: the product's embedded default data.

Layout of the output directory:
    world.json                           config and seed (rebuilds the world), dataset spec
    users.parquet, apps.parquet          feature records (for a feature store)
    impressions/day=YYYY-MM-DD.parquet   one file per day: context, features, label, truth
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ctrserve.loadtest.world import Requests, SyntheticWorld, WorldConfig

WORLD_FILE = "world.json"
IMPRESSIONS_DIR = "impressions"
DAY_PREFIX = "day="
FORMAT = 1
DEFAULT_START_DAY = dt.date(2026, 11, 1)
USER_FIELDS = ("user_id", "age_band", "gender", "region", "device", "activity",
               "recent_categories")  # fmt: skip
APP_FIELDS = ("app_id", "category", "developer", "price_band", "rating_band", "popularity",
              "size_mb")  # fmt: skip


def write_synthetic_logs(
    out_dir: Path,
    seed: int = 2026,
    days: int = 10,
    impressions_per_day: int = 50_000,
    start_day: dt.date = DEFAULT_START_DAY,
    progress: bool = True,
    **config_overrides: Any,
) -> dict[str, Any]:
    """Draw `days` days of impressions and downloads from the world of `seed` into `out_dir`.

    `config_overrides` are WorldConfig fields (n_users, pair_scale, ...). Existing day files
    and world.json in `out_dir` are replaced; world.json is written last, so an interrupted
    run leaves a directory that readers refuse.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if impressions_per_day < 1:
        raise ValueError(f"impressions_per_day must be >= 1, got {impressions_per_day}")
    config = WorldConfig.from_dict({**WorldConfig().to_dict(), **config_overrides, "seed": seed})
    started = time.perf_counter()
    out_dir = Path(out_dir)
    imp_dir = out_dir / IMPRESSIONS_DIR
    imp_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WORLD_FILE).unlink(missing_ok=True)
    for old in imp_dir.glob(f"{DAY_PREFIX}*.parquet"):
        old.unlink()

    world = SyntheticWorld(config)
    users, apps = user_table(world), app_table(world)
    _write(users, out_dir / "users.parquet")
    _write(apps, out_dir / "apps.parquet")

    rows_per_day: dict[str, int] = {}
    positives = 0
    files = []
    for i in tqdm(range(days), desc="synthetic days", unit="day",
                  disable=None if progress else True):  # None: no bar off a terminal
        day = start_day + dt.timedelta(days=i)
        table = day_table(world, users, apps, day, impressions_per_day, day_rng(seed, i))
        path = imp_dir / day_file_name(day)
        _write(table, path)
        rows_per_day[day.isoformat()] = table.num_rows
        positives += int(table.column("label").to_numpy().sum())
        files.append(str(path.relative_to(out_dir)))

    total = sum(rows_per_day.values())
    meta = {
        "format": FORMAT,
        "generator": "ctrserve.loadtest.synth_logs",
        "config": config.to_dict(),
        "spec": world.dataset_spec().to_dict(),
        "start_day": start_day.isoformat(),
        "days": days,
        "impressions_per_day": impressions_per_day,
        "files": files,
    }
    (out_dir / WORLD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "rows": total,
        "rows_per_day": rows_per_day,
        "positive_rate": positives / total,
        "files": [WORLD_FILE, "users.parquet", "apps.parquet", *files],
        "seconds": round(time.perf_counter() - started, 2),
    }


def day_rng(seed: int, day_index: int) -> np.random.Generator:
    """The random stream of one day, independent of how many days are generated."""
    return np.random.default_rng([seed, 1, day_index])


def day_file_name(day: dt.date) -> str:
    return f"{DAY_PREFIX}{day.isoformat()}.parquet"


def read_world_meta(out_dir: Path) -> dict[str, Any]:
    """The parsed world.json of a log directory."""
    return json.loads((Path(out_dir) / WORLD_FILE).read_text())


def load_world(out_dir: Path) -> SyntheticWorld:
    """Rebuild, exactly, the world that generated the logs in `out_dir`."""
    return SyntheticWorld(WorldConfig.from_dict(read_world_meta(out_dir)["config"]))


def user_table(world: SyntheticWorld) -> pa.Table:
    """All users' feature records, one row per user index."""
    return pa.table(world.user_columns(), schema=_schema(USER_FIELDS))


def app_table(world: SyntheticWorld) -> pa.Table:
    """All apps' feature records, one row per app index."""
    return pa.table(world.app_columns(), schema=_schema(APP_FIELDS))


def day_table(
    world: SyntheticWorld,
    users: pa.Table,
    apps: pa.Table,
    day: dt.date,
    impressions: int,
    rng: np.random.Generator,
) -> pa.Table:
    """One day of impressions, in time order, with downloads drawn from the true probability."""
    n_requests = math.ceil(impressions / world.config.slots)
    requests = world.sample_requests(rng, n_requests, day)
    imp = {k: v[:impressions] for k, v in requests.impressions().items()}
    prob = world.click_probability(imp["user"], imp["app"], imp["hour"], imp["weekday"],
                                   imp["slot"])  # fmt: skip
    label = world.sample_downloads(rng, prob)
    midnight = int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp())
    seconds = midnight + imp["hour"] * 3600 + imp["second"]
    user_rows = users.take(pa.array(imp["user"]))
    app_rows = apps.take(pa.array(imp["app"]))
    columns: dict[str, Any] = {
        "request_id": pa.array(_request_ids(requests, day)).take(pa.array(imp["request"])),
        "ts": pa.array(seconds * 1000, pa.timestamp("ms", "UTC")),  # parquet has no seconds
        "day": pa.array([day] * len(label), pa.date32()),
        "user_id": user_rows.column("user_id"),
        "app_id": app_rows.column("app_id"),
        "hour": pa.array(imp["hour"], pa.int8()),
        "weekday": pa.array(imp["weekday"], pa.int8()),
        "slot": pa.array(imp["slot"], pa.int8()),
    }
    for name in USER_FIELDS[1:]:
        columns[name] = user_rows.column(name)
    for name in APP_FIELDS[1:]:
        columns[name] = app_rows.column(name)
    columns["label"] = pa.array(label, pa.int8())
    columns["true_probability"] = pa.array(prob, pa.float64())
    return pa.table(columns)


def _request_ids(requests: Requests, day: dt.date) -> list[str]:
    stamp = day.strftime("%Y%m%d")
    return [f"r{stamp}-{i:06d}" for i in range(len(requests))]


def _schema(names: tuple[str, ...]) -> pa.Schema:
    types = {"recent_categories": pa.list_(pa.string()), "size_mb": pa.float64()}
    return pa.schema([(n, types.get(n, pa.string())) for n in names])


def _write(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic app-store impression logs.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--impressions-per-day", type=int, default=50_000)
    parser.add_argument("--start-day", type=dt.date.fromisoformat, default=DEFAULT_START_DAY)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = write_synthetic_logs(
            args.out_dir, seed=args.seed, days=args.days,
            impressions_per_day=args.impressions_per_day, start_day=args.start_day,
            progress=not args.quiet,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
