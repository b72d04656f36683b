"""The reader API's read-only Redis user, for real: the rules deploy/ ships, on a real Redis and a real Redis Cluster.

* ``compose``: one ``redis-server`` started with the very shell line ``deploy/compose.yaml`` gives its
  ``redis`` service (its environment, the rule file it mounts, the falkordb ``redis-server`` in place of
  the image's), and the reader's URL as compose spells it;
* ``k8s``: the session's 3-master Redis Cluster, given the ``users.acl`` line of
  ``deploy/k8s/redis-acl.yaml`` with ``ACL SETUSER`` on every node (plus a password).

Both name the rules of ``deploy/redis/reader.acl``. The project's own writers fill fusionrec's default
prefix (the embedding pool's store, a real user-state pipeline, a signed checkpoint), then ``fusionrec
serve`` runs on the reader's URL: every route answers and Redis logs no refusal (too narrow a rule fails
here), while writes with the reader's credentials are refused and no allowed command writes (too wide a
rule fails there).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
import yaml

from fusionrec.apps.services import RedisClusterServices, RunningServices, free_port, redis_binary
from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import prepare, version_info
from fusionrec.models.encoder import TextEncoder
from fusionrec.models.pool import build_embedder
from fusionrec.online.learning.checkpoints import Checkpoint, CheckpointStore
from fusionrec.online.learning.model import FusionModel
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.contract import CatalogEvent
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, make_settings, start_fusionrec, title, wait_for
from tests.paths import DEPLOY

ITEMS = 40
USERS = 8
SECRET = re.compile(r"\$\{(\w+)(?::\?[^}]*)?\}")  # a compose variable: ${NAME} or ${NAME:?message}


@dataclass
class Deployed:
    """fusionrec's state in a Redis that has the reader's ACL user, and how to reach it both ways."""

    admin: Settings  # the default user: what the writers use
    reader: Settings  # the reader's ACL user
    user: str
    nodes: list[redis.Redis]  # every node, as an administrator (ACL LOG, COMMAND INFO)
    checkpoint: int


def _rules(text: str) -> list[str]:
    """The words of an ACL rule file: comment lines dropped, split on whitespace (as compose's `sh` does)."""
    return " ".join(line for line in text.splitlines() if not line.startswith("#")).split()


def _compose_redis(tmp: Path, passwords: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, str]:
    """``redis-server`` started by compose's own command for the ``redis`` service; (process, port, reader URL)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["redis"]
    shell, flag, script = service["command"]
    assert (shell, flag) == ("sh", "-c")
    script = script.replace("$$", "$")  # compose's escape for a literal `$`
    for volume in service["volumes"]:
        source, _, target = volume.partition(":")
        if source.startswith("./"):
            script = script.replace(target.removesuffix(":ro"), str(DEPLOY / source))
    port = free_port()
    script += f" --port {port} --bind 127.0.0.1 --dir {tmp}"  # where compose has a container of its own
    env = {"PATH": f"{Path(redis_binary()).parent}{os.pathsep}{os.environ['PATH']}"}
    for name, value in service["environment"].items():
        env[name] = passwords[SECRET.fullmatch(value).group(1)]  # type: ignore[union-attr]
    proc = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = compose["services"]["reader"]["environment"]["FUSIONREC_REDIS_URL"]
    url = SECRET.sub(lambda m: passwords[m.group(1)], url).replace("@redis:6379", f"@127.0.0.1:{port}")
    return proc, port, url


@pytest.fixture(scope="module", params=["compose", "k8s"])
def deployed(request: pytest.FixtureRequest, services: RunningServices, tiny_bert: Callable[..., Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    admin_pw, reader_pw = secrets.token_hex(16), secrets.token_hex(16)
    proc: subprocess.Popen[bytes] | None = None
    if request.param == "compose":
        proc, port, reader_url = _compose_redis(tmp_path_factory.mktemp("compose-redis"), {
            "FUSIONREC_REDIS_PASSWORD": admin_pw, "FUSIONREC_REDIS_READER_PASSWORD": reader_pw})
        admin_url, user = f"redis://:{admin_pw}@127.0.0.1:{port}/0", "reader"
        nodes = [redis.Redis(port=port, password=admin_pw)]
        wait_for(lambda: _answers(nodes[0], proc), 20, "compose's redis-server to answer")
    else:
        cluster: RedisClusterServices = request.getfixturevalue("redis_cluster")
        line = next(doc for doc in yaml.safe_load_all((DEPLOY / "k8s/redis-acl.yaml").read_text())
                    if doc["kind"] == "ConfigMap")["data"]["users.acl"].split()
        assert line[0] == "user"
        user, admin_url = line[1], cluster.url
        reader_url = cluster.url.replace("redis+cluster://", f"redis+cluster://{user}:{reader_pw}@")
        nodes = [redis.Redis(port=node.port) for node in cluster.nodes]
        for node in nodes:
            node.execute_command("ACL", "SETUSER", *line[1:], f">{reader_pw}")
    for node in nodes:
        node.execute_command("ACL", "LOG", "RESET")
    # the prefix the rules name (`~fr:*`): fusionrec's default
    admin = make_settings(services, redis_url=admin_url, redis_prefix="fr", embed_model_path=str(tiny_bert()),
                          embed_threads=1, learn_reload_s=0.3, search_candidates=30)
    ensure_topics(admin)
    try:
        yield Deployed(admin, admin.replace(redis_url=reader_url), user, nodes, _populate(admin))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        else:
            for node in nodes:
                node.execute_command("ACL", "DELUSER", user)
                keys = list(node.scan_iter(match="fr:*", count=1000))
                for key in keys:  # one by one: a node's keys span many slots
                    node.delete(key)
        for node in nodes:
            node.close()


def _answers(client: redis.Redis, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"compose's redis-server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _populate(s: Settings) -> int:
    """Item vectors (the embedding pool's store), users' state and lists (a real user-state pipeline) and a
    signed fusion checkpoint, written as the default user; returns the checkpoint's number."""
    encoder = TextEncoder.from_settings(s, device="cpu", threads=1)
    embedder = build_embedder(s, encoder, None, worker="test")
    prepare(embedder.store, version_info(encoder.spec, s))
    embedder.process([CatalogEvent(item_id=str(i), op="upsert", ts=1_000 + i, title=title(i), category=f"c{i % 4}",
                                   brand=f"b{i % 3}", price=1.0 + i % 7) for i in range(ITEMS)])
    now = int(time.time() * 1000) - 3_600_000
    with EventProducer(s) as producer:
        for u in range(USERS):
            for j in range(5):
                producer.user_event({"event_id": f"e{u}-{j}", "type": "purchase", "user_id": f"u{u}",
                                     "item_id": str((u + j) % ITEMS), "ts": now + 1000 * (u * 10 + j)})
    with consume_until(s, USERS * 5):
        pass
    client = connect(s)
    try:
        return CheckpointStore(client, s).save(Checkpoint(model=FusionModel(), learned_from_ms=0, learned_to_ms=0,
                                                          examples=0, hit_rate=None))
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(deployed: Deployed) -> Iterator[httpx.Client]:
    """`fusionrec serve` on the reader's URL."""
    s = deployed.reader.replace(serve_port=free_port())
    proc = start_fusionrec(s, "serve", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{s.serve.port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 90, "serve to come up", interval=0.3)
    http = httpx.Client(base_url=url, timeout=60)
    try:
        yield http
    finally:
        http.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err.decode(), err.decode()[-4000:]


def _refusals(deployed: Deployed) -> list[tuple[str, str]]:
    """(reason, command or key) of every refusal Redis logged for the reader's user, on every node."""
    return [(e[b"reason"].decode(), e[b"object"].decode()) for node in deployed.nodes
            for e in node.execute_command("ACL", "LOG") if e[b"username"].decode() == deployed.user]


def test_every_route_answers_with_the_readers_user(deployed: Deployed, server: httpx.Client):
    def ok(path: str, **params: Any) -> Any:
        got = server.get(path, params=params)
        assert got.status_code == 200, (got.text, _refusals(deployed))
        return got.json()

    wait_for(lambda: ok("/readyz")["model"] == deployed.checkpoint, 30,
             "readiness to report the signed checkpoint the reader loaded")
    admin = RecommendationReader(connect(deployed.admin), deployed.admin)
    recs = ok("/v1/users/u3/recommendations", k=5)
    assert recs == msgspec.to_builtins(admin.top_k("u3", 5)) and not recs["fallback"]
    unknown = ok("/v1/users/nobody/recommendations", k=3)
    assert unknown["fallback"] and unknown["items"]
    similar = ok("/v1/items/3/similar", k=5)["similar"]
    assert [(h["item_id"], h["score"]) for h in similar] == [(i, round(s, 6)) for i, s in admin.similar_items("3", 5)]
    anonymous = ok("/v1/search", q=title(5), k=10)
    assert anonymous["items"][0]["item_id"] == "5" and anonymous["model"] == deployed.checkpoint
    # u5 bought items 5..9: the personal score, read from u5's state, lifts them
    personal = {h["item_id"]: h["f_item"] for h in ok("/v1/search", q=title(5), k=10, user_id="u5")["items"]}
    owned = {str(i) for i in range(5, 10)} & personal.keys() & {h["item_id"] for h in anonymous["items"]}
    assert owned and all(personal[i] > h["f_item"] for h in anonymous["items"] if (i := h["item_id"]) in owned)
    assert server.get("/metrics").status_code == 200
    # nothing refused on the way, not even what a client swallows (CLIENT SETINFO when it connects)
    assert _refusals(deployed) == []


# What a reader must never do, each with arguments that would succeed as the default user.
WRITES: list[tuple[str, Callable[[redis.Redis, Keys], Any]]] = [
    ("SET a stored list", lambda r, k: r.set(k.user_rec("u3"), b"{}")),
    ("DEL a stored list", lambda r, k: r.delete(k.user_rec("u3"))),
    ("ZADD to popularity", lambda r, k: r.zadd(k.popularity(), {"evil": 1e9})),
    ("HSET catalog metadata", lambda r, k: r.hset(k.item_meta("3"), "title", "x")),
    ("EXPIRE a stored list", lambda r, k: r.expire(k.user_rec("u3"), 1)),
    ("SET the checkpoint head", lambda r, k: r.set(k.fusion("head"), 1)),
    ("VREM from the vector set", lambda r, k: r.execute_command("VREM", k.vector_set("v"), "3")),
    ("write through a script", lambda r, k: r.eval("return redis.call('DEL', KEYS[1])", 1, k.user_rec("u3"))),
    ("FLUSHALL", lambda r, k: r.flushall()),
    ("SCRIPT FLUSH", lambda r, k: r.script_flush()),
    ("CONFIG SET", lambda r, k: r.config_set("maxmemory", "1")),
    ("read outside the prefix", lambda r, k: r.get("other:key")),
]


@pytest.mark.parametrize(("what", "write"), WRITES, ids=[w for w, _ in WRITES])
def test_the_readers_user_cannot_write(deployed: Deployed, what: str, write: Callable[[redis.Redis, Keys], Any]):
    keys = Keys.for_settings(deployed.admin)
    admin = connect(deployed.admin)
    reader = connect(deployed.reader)
    before = admin.get(keys.user_rec("u3"))
    try:
        assert before is not None
        with pytest.raises(redis.ResponseError, match="(?i)no permissions"):
            write(reader, keys)
        assert admin.get(keys.user_rec("u3")) == before
        assert admin.zscore(keys.popularity(), "evil") is None
    finally:
        reader.close()
        admin.close()


def test_no_command_the_readers_user_may_run_writes(deployed: Deployed):
    """Every command the user's rules allow (as Redis reports them) is neither a write nor an admin command."""
    for node in deployed.nodes:
        user = node.acl_getuser(deployed.user)
        # nothing but single commands on top of -@all: no category, nothing taken back from a wider grant
        assert user["categories"] == ["-@all"] and all(c.startswith("+") for c in user["commands"]), user
        assert user["keys"] == ["~fr:*"] and user["channels"] == [] and user["selectors"] == [], user
        info = node.execute_command("COMMAND", "INFO", *(c[1:] for c in user["commands"]))
        assert len(info) == len(user["commands"])
        for name, spec in info.items():
            assert "write" not in spec["flags"], name
            assert not {"@write", "@admin", "@dangerous"} & set(spec["acl_categories"]), name
