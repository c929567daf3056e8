"""The test Redis Cluster is real: keys spread over three masters, Lua only within one slot.

What redis-py does in cluster mode, as these tests pin it down: scripts run on the node owning
their keys and are refused client-side when keys span slots; pipeline(transaction=False) splits
across slots; inside a cluster pipeline EVALSHA is blocked (so `script(client=pipe)` raises) but
execute_command("EVALSHA", ...) after script_load (which loads on every primary) is routed by key.
"""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from ctrserve.loadtest.redis_servers import LocalCluster

LUA = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[2], ARGV[2])"
KEYS = [f"infra:{i}" for i in range(30)]
TAGS = "tvw"  # hash tags in slots 15891, 7761, 3696: one on each master


def test_keys_spread_over_three_masters(redis_cluster: LocalCluster) -> None:
    rc = RedisCluster.from_url(redis_cluster.url)
    assert len(rc.get_primaries()) == 3
    for key in KEYS:
        rc.set(key, key)
    owners = {rc.get_node_from_key(key).port for key in KEYS}
    assert owners == {port for _, port in redis_cluster.nodes}
    for key in KEYS:  # the server's slot agrees, and the key lives on that node alone
        assert rc.cluster_keyslot(key) == rc.keyslot(key)
        node = rc.get_node_from_key(key)
        assert redis.Redis(host=node.host, port=node.port).get(key) == key.encode()
    rc.close()


def test_lua_script_within_one_slot_only(redis_cluster: LocalCluster) -> None:
    rc = RedisCluster.from_url(redis_cluster.url)
    script = rc.register_script(LUA)
    assert script(keys=["{t}a", "{t}b"], args=["x", 2]) == 2
    assert rc.get("{t}a") == b"x"
    with pytest.raises(RedisClusterException, match="same key slot"):  # refused by the client
        script(keys=["a", "b"], args=["x", 2])
    node = rc.get_node_from_key("a")  # and by the server, sent straight to a node
    with pytest.raises(ClusterCrossSlotError):  # the server's CROSSSLOT reply
        redis.Redis(host=node.host, port=node.port).eval(LUA, 2, "a", "b", "x", 2)
    rc.script_load(LUA)  # every primary, so EVALSHA in a pipeline works on whichever node
    assert len({rc.get_node_from_key(f"{{{tag}}}a").port for tag in TAGS}) == 3
    pipe = rc.pipeline(transaction=False)
    for tag in TAGS:
        pipe.execute_command("EVALSHA", script.sha, 2, f"{{{tag}}}a", f"{{{tag}}}b", "x", 1)
    assert pipe.execute() == [3, 1, 1]
    rc.close()


def test_async_cluster_pipeline_and_scripts(redis_cluster: LocalCluster) -> None:
    async def run() -> None:
        rc = AsyncRedisCluster.from_url(redis_cluster.url)
        try:
            pipe = rc.pipeline(transaction=False)
            for key in KEYS:
                pipe.set(f"async:{key}", 1)
            assert await pipe.execute() == [True] * len(KEYS)
            script = rc.register_script(LUA)
            await rc.script_flush()
            assert await script(keys=["{t}c", "{t}d"], args=["y", 5]) == 5  # reloads the script
            await rc.script_load(LUA)  # every primary, so EVALSHA works on whichever node
            pipe = rc.pipeline(transaction=False)
            for tag in TAGS:
                pipe.execute_command("EVALSHA", script.sha, 2, f"{{{tag}}}c", f"{{{tag}}}d", "y", 1)
            assert await pipe.execute() == [6, 1, 1]
        finally:
            await rc.aclose()

    asyncio.run(run())


def test_standalone_server_is_debian_redis(redis_server_url: str) -> None:
    info = redis.Redis.from_url(redis_server_url).info("server")
    assert info["redis_mode"] == "standalone" and int(info["redis_version"].split(".")[0]) >= 7
