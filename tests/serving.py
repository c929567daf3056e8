"""Helpers for the scorer tests: a real uvicorn server on a loopback port, reference scores."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import uvicorn

from ctrserve.bundles import load_bundle
from ctrserve.service.server import uvicorn_config
from ctrserve.service.settings import Settings


class LiveServer:
    """The scorer app under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, settings: Settings):
        if "admission_target_ms" not in settings.model_fields_set:
            # the scorer shares this process with the test runner, whose pauses (a full
            # collection of its large heap, its threads holding the GIL) are no queue in front
            # of the scorer, yet the gate's default 100 ms wait shed a test's lone request
            settings = settings.model_copy(update={"admission_target_ms": 2000.0})
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def app(self) -> Any:
        return self.server.config.app

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the scorer did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class World:
    """Feature records of a synth dir, to compute reference scores without the scorer."""

    def __init__(self, synth_dir: Path):
        self.users = {r["user_id"]: r for r in pq.read_table(synth_dir / "users.parquet")
                      .to_pylist()}
        self.apps = {r["app_id"]: r for r in pq.read_table(synth_dir / "apps.parquet")
                     .to_pylist()}

    def rows(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The raw feature rows a score request stands for (request values win)."""
        user = self.users.get(body["user_id"], {})
        rows = []
        for pos, cand in enumerate(body["candidates"], 1):
            row = {**user, **body.get("user_features", {}), **body.get("context", {})}
            row.update(self.apps.get(cand["item_id"], {}))
            row.update(user_id=body["user_id"], app_id=cand["item_id"], slot=pos)
            row.update(cand.get("features", {}))
            rows.append(row)
        return rows


def direct_scores(bundle_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """The bundle's own encoder and onnxruntime session on these rows, one batch."""
    bundle = load_bundle(bundle_dir)
    columns = {f: [r.get(f) for r in rows] for f in bundle.encoder.spec.names}
    feeds = bundle.encoder.transform(columns)
    return bundle.session.run(None, feeds)[0].reshape(-1)


def metric_value(text: str, name: str) -> float:
    """Sum of a Prometheus sample over its label sets, from /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def copy_registry(bundles: dict[str, Path], dest: Path, models: tuple[str, ...] = ("lr", "deepfm"),
                  broken: bool = False) -> Path:
    """A registry holding copies of the fixture bundles; `broken` adds a DeepFM copy whose
    model file was altered (it must fail verification)."""
    for model in models:
        shutil.copytree(bundles[model], dest / bundles[model].name)
    if broken:
        bad = dest / "deepfm-broken"
        shutil.copytree(bundles["deepfm"], bad)
        with (bad / "model.onnx").open("ab") as fh:
            fh.write(b"\0")
    return dest
