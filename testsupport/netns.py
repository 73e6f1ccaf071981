"""Hosts on one machine: network namespaces joined by a switch, each running batchsvc as a host
of a fleet would (README, "Run on a GPU fleet").

:class:`Network` builds one namespace per host and a ``switch`` namespace holding a bridge;
each host is joined to the bridge by a veth pair (``eth0`` in the host, ``p-<host>`` on the
switch) with an address in :data:`SUBNET`, and has its loopback up. Nothing is created in the
machine's own namespace: the addresses exist only inside the namespaces, so two runs side by
side (or the machine's own network) never meet. :meth:`Network.cut` sets a host's ``eth0``
down, as a pulled cable; :meth:`Network.restore` sets it up again.

:class:`Fleet` runs batchsvc on such a network with :mod:`testsupport.launcher`'s stacks, one
per host, every process started through ``ip netns exec``:

- the **control host**: a ``redis-server`` (the embedded binary) bound to its own veth
  address with ``requirepass``, then ``batchsvc web``, ``control`` and ``beat`` on one data dir,
  all with ``REDIS_URL=redis://:PASSWORD@ADDRESS:6379/0``;
- each **GPU host**: a fake upstream (:mod:`testsupport.fake_upstream`) on
  ``127.0.0.1:8000`` *inside its own namespace*, and ``make run-worker`` with the same
  ``REDIS_URL``. Every GPU host's model server has the same address in its own namespace, so
  one model registry (``base_url = UPSTREAM_BASE_URL``) serves all of them, as the README's
  registry does on a real fleet.

The calling thread is a client on the control host: :func:`fleet` moves it into the control
namespace (``setns``, one thread only) for the block, so the launcher's client calls (health
checks, Celery pings, the API at ``127.0.0.1``) reach that host; :meth:`Network.entered` moves
it into another host for a moment (a GPU host's upstream statistics).

:func:`fleet` always stops every process and removes every veth and namespace it made, even when
its block fails; every wait is bounded. Namespaces are named ``bsvc-<pid>-<tag>-<host>``: a
run that was itself killed leaves namespaces that the next :meth:`Network.build` removes once
their creator's pid is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psutil
import requests

from batchsvc.cli import inference_nodes
from batchsvc.embedded_redis import server_binary
from batchsvc.settings import Settings
from testsupport import launcher
from testsupport.launcher import BIN, REPO_ROOT, Proc, Timeouts, answers, wait_until

#: The private /24 the hosts' addresses come from (only inside the namespaces).
SUBNET = "10.77.0"
PREFIX_LEN = 24
#: The control host's address; GPU host ``i`` (from 1) gets ``.<10 + i>``.
CONTROL_ADDRESS = f"{SUBNET}.1"
#: Redis's port on the control host (each namespace has every port free).
REDIS_PORT = 6379
#: Where each GPU host's model server listens, inside its own namespace (vLLM's usual port).
UPSTREAM_PORT = 8000
#: The ``base_url`` of every GPU host's model server, as its worker reaches it.
UPSTREAM_BASE_URL = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
#: The interface name of each host's end of its veth pair.
HOST_INTERFACE = "eth0"
#: A bound on every ``ip`` call: a hung one must not hang the run.
IP_TIMEOUT_S = 15.0
#: How long removal waits for the processes left in a namespace to die after SIGKILL.
KILL_WAIT_S = 10.0

_PREFIX = "bsvc"
_NAME = re.compile(rf"^{_PREFIX}-(\d+)-[0-9a-f]+-")
_CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    """An ``ip`` command failed, or a namespace could not be entered or removed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"ip {' '.join(args)} took over {IP_TIMEOUT_S:g} s") from exc
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (``None``: they can): not root, no ``ip``, or
    ``ip netns add`` refused (a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return "building network namespaces needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian's iproute2)"
    probe = f"{_PREFIX}-{os.getpid()}-0-probe"
    try:
        result = _ip("netns", "add", probe, check=False)
    except NetnsError as exc:
        return str(exc)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _setns(fd: int) -> None:
    """Move the calling thread (only it) into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(errno)}")


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """The calling thread inside namespace ``name`` for the block, then back where it was.

    A network namespace is a property of each thread: the sockets the thread opens meanwhile,
    and the threads it starts, belong to ``name`` and keep it; other threads are untouched.
    """
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        there = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(there)
        finally:
            os.close(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)


@dataclass(frozen=True)
class Host:
    """One host of the network: a namespace and its address on the switch."""

    #: ``control`` or ``gpu<i>``.
    name: str
    #: The namespace's name (unique to the run).
    netns: str
    address: str

    @property
    def port(self) -> str:
        """Its veth end on the switch (an interface name: at most 15 characters)."""
        return f"p-{self.name}"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: the pid is kept)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Network:
    """The switch namespace, a control host and ``gpu_hosts`` GPU hosts; see the module
    docstring. Use it through :func:`network` or :func:`fleet`, which remove it."""

    def __init__(self, gpu_hosts: int) -> None:
        if gpu_hosts < 1:
            raise ValueError("gpu_hosts must be >= 1")
        base = f"{_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{base}-switch"
        self.control = Host("control", f"{base}-control", CONTROL_ADDRESS)
        self.gpus = [
            Host(f"gpu{i}", f"{base}-gpu{i}", f"{SUBNET}.{10 + i}") for i in range(1, gpu_hosts + 1)
        ]
        # What exists, in order of creation, so removal undoes exactly that.
        self._namespaces: list[str] = []
        self._ports: list[str] = []

    @property
    def hosts(self) -> list[Host]:
        return [self.control, *self.gpus]

    def build(self) -> None:
        remove_stale()
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            # Both ends made from the switch: the machine's own namespace never holds either.
            _ip(
                "-n", self.switch, "link", "add", host.port, "type", "veth",
                "peer", "name", HOST_INTERFACE, "netns", host.netns,
            )  # fmt: skip
            self._ports.append(host.port)
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            _ip(
                "-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}",
                "dev", HOST_INTERFACE,
            )  # fmt: skip
            _ip("-n", host.netns, "link", "set", HOST_INTERFACE, "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def remove(self) -> None:
        """Kill whatever still runs in the namespaces, delete the veths and the namespaces.
        Every step is tried; the first failure is raised at the end."""
        errors: list[BaseException] = []
        for name in reversed(self._namespaces):
            try:
                kill_namespace_pids(name)
            except (NetnsError, OSError) as exc:
                errors.append(exc)
        for port in list(reversed(self._ports)):
            try:
                _ip("-n", self.switch, "link", "del", port)
                self._ports.remove(port)
            except NetnsError as exc:
                errors.append(exc)
        for name in reversed(list(self._namespaces)):
            try:
                _ip("netns", "delete", name)
                self._namespaces.remove(name)
            except NetnsError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- using it ---------------------------------------------------------------------------

    def entered(self, host: Host) -> contextlib.AbstractContextManager[None]:
        """The calling thread on ``host`` for the block (see :func:`entered_netns`)."""
        return entered_netns(host.netns)

    def run(
        self, host: Host, argv: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on ``host`` to its end (bounded by ``timeout``); its output captured."""
        return subprocess.run(
            host.exec_argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def set_link(self, host: Host, up: bool) -> None:
        """Set ``host``'s veth up or down. Down is a pulled cable: the host's new connections
        fail (no route), its open ones stall, and the other hosts hear nothing from it."""
        _ip("-n", host.netns, "link", "set", HOST_INTERFACE, "up" if up else "down")

    def cut(self, host: Host) -> None:
        self.set_link(host, up=False)

    def restore(self, host: Host) -> None:
        self.set_link(host, up=True)


def namespace_pids(name: str) -> list[int]:
    """The processes in namespace ``name`` (``ip netns pids``), this one left out."""
    result = _ip("netns", "pids", name, check=False)
    if result.returncode != 0:
        return []
    return [int(p) for p in result.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def kill_namespace_pids(name: str) -> None:
    """SIGKILL every process left in namespace ``name`` (all started there by us) and wait,
    for at most :data:`KILL_WAIT_S`, until none is left."""
    deadline = time.monotonic() + KILL_WAIT_S
    while pids := namespace_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} still in namespace {name} after SIGKILL")
        time.sleep(0.05)


def remove_stale() -> None:
    """Remove the namespaces a run of this module left behind when it was itself killed (its
    pid, in the name, is gone): their processes, veths go with them."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return
    for name in names:
        match = _NAME.match(name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        kill_namespace_pids(name)
        _ip("netns", "delete", name, check=False)


@contextlib.contextmanager
def network(gpu_hosts: int) -> Iterator[Network]:
    """A built :class:`Network`, removed at the end whatever happens."""
    net = Network(gpu_hosts)
    try:
        net.build()
        yield net
    finally:
        net.remove()


# -- batchsvc on the hosts ---------------------------------------------------------------------


class HostStack(launcher.Stack):
    """The launcher's stack for the processes of one host: each runs through ``ip netns exec``
    and reaches Redis at ``redis_url`` (the control host's). Client calls the launcher makes
    (health checks, Celery pings) go from the calling thread, which must be on a host that
    reaches the service: :func:`fleet` keeps it on the control host."""

    #: Besides the launcher's: a calling ``make`` passes its flags and command-line variables
    #: to sub-makes through these (``make test PYTEST_ARGS=...`` would reach ``run-worker``),
    #: and ``WORKER_PROCESSES`` / ``REDIS_SENTINELS`` would change the worker or its Redis.
    drop_env: ClassVar[frozenset[str]] = launcher.Stack.drop_env | {
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "MAKEOVERRIDES",
        "GNUMAKEFLAGS",
        "VENV",
        "WORKER_PROCESSES",
        "REDIS_SENTINELS",
    }
    # Two cores start a whole fleet at once: generous, but bounded.
    timeouts: ClassVar[Timeouts] = Timeouts(redis=20, api=60, upstream=30, node=90, stop=10)

    def __init__(
        self,
        host: Host,
        root: Path,
        redis_url: str,
        config_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, config_path, {**(extra_env or {}), "REDIS_URL": redis_url})
        self.host = host
        self._redis_url = redis_url

    def command(self, argv: list[str]) -> list[str]:
        return self.host.exec_argv(argv)

    def redis_url(self) -> str:
        return self._redis_url


class ControlHost(HostStack):
    """Redis (bound to the host's veth address, with a password), the API, control and beat."""

    def start_redis(self) -> Proc:
        """The embedded ``redis-server`` binary, configured as the README's fleet Redis: the
        private address, ``requirepass``, AOF."""
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        password = urllib.parse.urlsplit(self._redis_url).password or ""
        # fmt: off
        argv = [
            server_binary(),
            "--bind", self.host.address,
            "--port", str(REDIS_PORT),
            "--requirepass", password,
            "--dir", str(redis_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]
        # fmt: on
        proc = self.spawn("redis", argv)
        self._wait_ready(proc, self._ping, self.timeouts.redis, "redis")
        return proc


class GpuHost(HostStack):
    """A fake model server and ``make run-worker`` next to it."""

    #: The fake upstream, once started.
    upstream: Proc | None = None

    def start_upstream(self, latency_s: float, max_concurrency: int) -> Proc:
        """The fake upstream on ``127.0.0.1:8000`` in this host's namespace, serving at most
        ``max_concurrency`` requests at once, each taking ``latency_s``."""
        # fmt: off
        argv = [
            sys.executable, "-m", "testsupport.fake_upstream",
            "--host", "127.0.0.1",
            "--port", str(UPSTREAM_PORT),
            "--latency", str(latency_s),
            "--max-concurrency", str(max_concurrency),
        ]
        # fmt: on
        self.upstream = self.spawn("upstream", argv, PYTHONPATH=str(REPO_ROOT))
        return self.upstream

    def spawn_worker(self, models: str, concurrency: int) -> Proc:
        """``make run-worker MODELS=... CONCURRENCY=...`` (the README's command) from the
        checkout; wait for it with :meth:`wait_worker`."""
        venv = BIN.parent
        # fmt: off
        argv = [
            "make", "--no-print-directory", "-C", str(REPO_ROOT),
            # The stamp is already made by the installation running this: no host should run
            # pip (there is no network), whatever the stamp's age against pyproject.toml.
            f"--assume-old={venv}/.installed-stamp",
            "run-worker", f"MODELS={models}", f"CONCURRENCY={concurrency}", f"VENV={venv}",
        ]
        # fmt: on
        # WORKER_PROCESSES=auto: the product's layout (one process up to 16 threads).
        return self.spawn("worker", argv, WORKER_PROCESSES="auto")

    def wait_worker(self, proc: Proc, models: str, concurrency: int) -> None:
        """Wait until each Celery node of the ``batchsvc worker`` that ``make`` started
        answers a ping."""

        def launcher_pid() -> int | None:
            if not proc.alive():
                raise RuntimeError(f"make run-worker exited:\n{proc.tail()}")
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        cmdline = child.cmdline()
                        if cmdline[-1:] == ["worker"] and any(
                            Path(arg).name == "batchsvc" for arg in cmdline
                        ):
                            return int(child.pid)
            return None

        pid = wait_until(launcher_pid, self.timeouts.node, "batchsvc worker under make")
        env = self.env(MODELS=models, CONCURRENCY=str(concurrency), WORKER_PROCESSES="auto")
        layout = Settings.from_env(env).worker_layout(os.cpu_count() or 1)
        for node in inference_nodes(pid, len(layout), socket.gethostname()):
            self.wait_node(proc, node)


class Fleet:
    """batchsvc on a :class:`Network`: a :class:`ControlHost` and one :class:`GpuHost` per GPU
    host, all on one model registry (``config_path``) and one Redis, each host with its own
    data dir under ``root/<host>``."""

    def __init__(
        self,
        net: Network,
        root: Path,
        config_path: Path,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.network = net
        # Hex: no character a URL reserves.
        self.redis_url = f"redis://:{secrets.token_hex(16)}@{net.control.address}:{REDIS_PORT}/0"
        self.control = ControlHost(
            net.control, root / net.control.name, self.redis_url, config_path, extra_env
        )
        self.gpus = [
            GpuHost(host, root / host.name, self.redis_url, config_path, extra_env)
            for host in net.gpus
        ]

    @property
    def stacks(self) -> list[HostStack]:
        return [self.control, *self.gpus]

    def start_control(self) -> None:
        """Redis, then the API, control and beat, each once the one before is ready."""
        self.control.start_redis()
        self.control.start_api()
        self.control.start_control()
        self.control.start_beat()

    def start_upstreams(self, latency_s: float, max_concurrency: int) -> None:
        """Every GPU host's fake upstream, started together, each waited for on its host."""
        procs = [gpu.start_upstream(latency_s, max_concurrency) for gpu in self.gpus]
        for gpu, proc in zip(self.gpus, procs, strict=True):
            with self.network.entered(gpu.host):
                gpu._wait_ready(
                    proc,
                    lambda: answers(f"http://127.0.0.1:{UPSTREAM_PORT}/health"),
                    gpu.timeouts.upstream,
                    f"the fake upstream of {gpu.host.name}",
                )

    def start_workers(
        self, gpus: Sequence[GpuHost], models: str, concurrency: int
    ) -> dict[GpuHost, Proc]:
        """``make run-worker`` on each of ``gpus``, started together, then each waited for."""
        procs = {gpu: gpu.spawn_worker(models, concurrency) for gpu in gpus}
        for gpu, proc in procs.items():
            gpu.wait_worker(proc, models, concurrency)
        return procs

    def stop_worker(self, gpu: GpuHost, proc: Proc, timeout: float | None = None) -> bool:
        """Stop a worker as ``systemctl stop`` would: SIGTERM, then SIGKILL after ``timeout``
        (default: the stack's stop timeout). ``make`` waits for the worker, and the worker for
        its Celery processes, which first finish the lines they hold. Returns whether it
        exited by itself; either way, nothing of it is left on its host after."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=gpu.timeouts.stop if timeout is None else timeout)
            clean = True
        except subprocess.TimeoutExpired:
            proc.kill()
            clean = False
        # A child that outlived ``make`` (SIGKILLed) is still on the host: end it too.
        keep = {gpu.upstream.pid} if gpu.upstream is not None and gpu.upstream.alive() else set()
        try:
            wait_until(
                lambda: set(namespace_pids(gpu.host.netns)) <= keep,
                gpu.timeouts.stop,
                f"the worker of {gpu.host.name} to exit",
            )
        except TimeoutError:
            for pid in set(namespace_pids(gpu.host.netns)) - keep:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return clean

    def upstream(self, gpu: GpuHost, path: str) -> dict[str, Any]:
        """``/_fake/<path>`` of ``gpu``'s upstream, asked from that host: GET ``stats``, POST
        anything else (``reset``)."""
        url = f"http://127.0.0.1:{UPSTREAM_PORT}/_fake/{path}"
        with self.network.entered(gpu.host):
            if path == "stats":
                resp = requests.get(url, timeout=10)
            else:
                resp = requests.post(url, json=None, timeout=10)
        resp.raise_for_status()
        return dict(resp.json())

    def cut(self, gpu: GpuHost) -> None:
        self.network.cut(gpu.host)

    def restore(self, gpu: GpuHost) -> None:
        self.network.restore(gpu.host)

    def procs(self) -> list[tuple[HostStack, Proc]]:
        return [(stack, proc) for stack in self.stacks for proc in stack.procs]

    def stop_all(self) -> None:
        # GPU hosts first: workers go before the Redis they would otherwise reconnect to.
        for stack in [*self.gpus, self.control]:
            stack.stop_all()

    def dump_logs(self, n: int = 25) -> None:
        for stack in self.stacks:
            sys.stdout.write(f"=== host {stack.host.name} ({stack.host.address}) ===\n")
            stack.dump_logs(n)


@contextlib.contextmanager
def fleet(
    root: Path,
    gpu_hosts: int,
    models_toml: str,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Fleet]:
    """A :class:`Fleet` on a fresh :class:`Network`, nothing started yet, with the calling
    thread on the control host. At the end (whatever happens): log tails printed if the block
    failed, every process stopped, the thread back in its own namespace, the network removed.
    """
    config = root / "models.toml"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(models_toml)
    with network(gpu_hosts) as net:
        built = Fleet(net, root, config, extra_env)
        try:
            with net.entered(net.control):
                yield built
        except BaseException:
            built.dump_logs()
            raise
        finally:
            built.stop_all()
