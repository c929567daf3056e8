"""Lua scripts run by EVALSHA, many calls in one pipeline, on a Redis or a Redis Cluster.

EVALSHA by hand rather than redis-py's Script: a cluster pipeline refuses Script objects, and
it does not load a script a node lacks. A NOSCRIPT reply (a restarted or new node) loads the
script and runs just those calls again: they did nothing the first time.
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import NoScriptError

Call = tuple[list[str], list[Any]]  # (keys, args)


class PipelinedScript:
    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def add(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Queue one call on a pipeline (its NOSCRIPT is the caller's to handle)."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run(self, client: Any, calls: list[Call]) -> list[Any]:
        """The script's reply to each call, in order; a call's error is raised."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for j in todo:
                self.add(pipe, *calls[j])
            got = await pipe.execute(raise_on_error=False) if todo else []
            missing = []
            for j, reply in zip(todo, got, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(j)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[j] = reply
            if not missing:
                break
            await client.script_load(self.source)
            todo = missing
        return replies
