"""`fusionrec up` / `status` / `down`: real servers in a run folder of their own, and nothing left behind."""

import os
import subprocess
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from fusionrec.apps.services import EmbeddedServices, RedisClusterServices
from fusionrec.core.errors import ServiceError
from tests.integration.helpers import fusionrec_cmd


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_up_status_down_starts_real_servers_and_leaves_nothing(tmp_path):
    svc = EmbeddedServices(tmp_path)
    running = svc.up(persistence="aof")
    try:
        assert running.broker and running.redis
        assert redis.Redis.from_url(running.redis_url).info("server")["redis_version"].startswith("8.")
        assert redis.Redis.from_url(running.redis_url).config_get("appendonly")["appendonly"] == "yes"
        md = AdminClient({"bootstrap.servers": running.kafka_bootstrap}).list_topics(timeout=10)
        assert md.brokers
        again = svc.up()
        assert (again.broker.pid, again.redis.pid) == (running.broker.pid, running.redis.pid)
    finally:
        stopped = svc.down()
    assert sorted(stopped) == ["broker", "redis"]
    assert not _alive(running.broker.pid) and not _alive(running.redis.pid)
    assert svc.status() is None


def test_the_embedded_redis_requires_its_generated_password(tmp_path):
    svc = EmbeddedServices(tmp_path)
    running = svc.up(kafka=False, persistence="none")
    try:
        port = running.redis.port
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).set("planted", b"x")
        password = (tmp_path / "redis.password").read_text().strip()
        assert len(password) >= 32 and password in running.redis_url
        assert redis.Redis.from_url(running.redis_url).ping()
        for name in ("redis.password", "redis.conf"):
            assert (tmp_path / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
        with open(f"/proc/{running.redis.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()  # not on the command line, where `ps` shows it
    finally:
        svc.down()


def test_cli_up_status_down(tmp_path):
    env = {**os.environ, "FUSIONREC_RUN_DIR": str(tmp_path)}
    env.pop("FUSIONREC_KAFKA_BOOTSTRAP", None)
    env.pop("FUSIONREC_REDIS_URL", None)

    def cli(*args):
        return subprocess.run(fusionrec_cmd(*args), env=env, capture_output=True, text=True, timeout=120)

    up = cli("up", "--persistence", "none")
    assert up.returncode == 0, up.stderr
    status = cli("status")
    assert status.returncode == 0 and "broker" in status.stdout and "redis" in status.stdout
    assert (tmp_path / "redis.password").read_text().strip() not in status.stdout  # printed masked
    pids = [int(tok.split("=")[1]) for tok in status.stdout.split() if tok.startswith("pid=")]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    down = cli("down")
    assert down.returncode == 0 and "broker" in down.stdout
    assert not any(_alive(p) for p in pids)
    assert cli("status").returncode == 1


def test_a_cluster_that_cannot_form_leaves_no_process(tmp_path):
    cluster = RedisClusterServices(tmp_path, masters=3)
    with pytest.raises(ServiceError, match="cluster_state:ok"):
        cluster.up(timeout=0.0)
    assert cluster.nodes == []
    assert not list(_cluster_processes(tmp_path))


def _cluster_processes(run_dir):
    """redis-server processes whose working directory is under ``run_dir``."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd, exe = Path(os.readlink(proc / "cwd")), os.readlink(proc / "exe")
                if cwd.is_relative_to(run_dir) and "redis-server" in exe:
                    yield int(proc.name)
            except OSError:
                continue


def test_start_redis_returns_once_its_aof_is_loaded(tmp_path: Path):
    """A run dir with a large AOF: Redis accepts connections while it still loads, answering LOADING;
    start_redis returns only once it answers commands (the demo's first SCAN raised BusyLoadingError)."""
    from fusionrec.apps.services import _stop, redis_url, start_redis

    info = start_redis(tmp_path, "aof")
    client = redis.Redis.from_url(redis_url(info))
    pipe = client.pipeline(transaction=False)
    for n in range(20_000):
        pipe.set(f"k{n}", os.urandom(8_000))
        if n % 1000 == 999:
            pipe.execute()
    client.close()
    _stop(info)  # SIGTERM: the AOF stays, about 160 MB
    info = start_redis(tmp_path, "aof", port=info.port)
    client = redis.Redis.from_url(redis_url(info))
    try:
        assert client.dbsize() == 20_000  # no BusyLoadingError
    finally:
        client.close()
        _stop(info)
