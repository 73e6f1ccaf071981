"""The ``batchsvc`` command: admin (projects, keys, models) and the process launchers the
Procfile uses. Admin commands print exactly one compact JSON line on stdout (``status`` prints
a table unless given ``--json``); everything else goes to stderr, so scripts can parse the
output."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from batchsvc import embedded_redis, redis_connect
from batchsvc.client import add_commands as add_client_commands
from batchsvc.cpu_priority import lower_cpu_priority
from batchsvc.errors import BatchsvcError, ConfigError
from batchsvc.models_config import load_registry
from batchsvc.projects import ProjectStore
from batchsvc.queues import CONTROL_QUEUE, DISPATCH_QUEUE
from batchsvc.settings import Settings

if TYPE_CHECKING:
    from batchsvc.metrics.exposition import GroupExport

DEMO_FILE = "demo.env"
DEMO_PROJECT_NAME = "demo"


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _connect(settings: Settings, wait_s: float = 5.0) -> redis.Redis:
    return redis_connect.connect(settings, wait_s=wait_s)


def _child_redis_url(settings: Settings, wait_s: float = 60.0) -> str | None:
    """The ``REDIS_URL`` a launcher hands the processes it starts: the embedded server's address
    (resolved once, waiting for it up to ``wait_s``) or ``REDIS_URL`` itself. ``None`` under
    Sentinel: the children inherit the launcher's environment, so they read the very
    ``REDIS_SENTINELS`` variables it read (a ``REDIS_URL`` beside them would be refused)."""
    if settings.redis_sentinel is not None:
        return None
    return embedded_redis.resolve_url(settings, wait_s=wait_s)


def _redis_env(redis_url: str | None) -> dict[str, str]:
    return {} if redis_url is None else {"REDIS_URL": redis_url}


# -- admin ---------------------------------------------------------------------------------


def cmd_projects_create(settings: Settings, args: argparse.Namespace) -> int:
    models = None
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        registry = load_registry(settings.config_path)
        unknown = [m for m in models if m not in registry]
        if unknown:
            raise ConfigError(f"unknown model(s): {', '.join(unknown)}")
    project, key = ProjectStore(_connect(settings)).create_project(
        args.name, models, weight=args.weight
    )
    _emit({"project_id": project.id, "api_key": key.api_key})
    return 0


def cmd_projects_update(settings: Settings, args: argparse.Namespace) -> int:
    project = ProjectStore(_connect(settings)).set_weight(args.project_id, args.weight)
    _emit(project.to_dict())
    return 0


def cmd_projects_list(settings: Settings, args: argparse.Namespace) -> int:
    _emit([p.to_dict() for p in ProjectStore(_connect(settings)).list_projects()])
    return 0


def cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    key = ProjectStore(_connect(settings)).create_key(args.project)
    _emit({"project_id": key.project_id, "api_key": key.api_key})
    return 0


def cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    """Every key (of one project with ``PROJECT``) by its prefix, never the key itself."""
    keys = ProjectStore(_connect(settings)).list_keys(args.project)
    _emit([key.to_dict() for key in keys])
    return 0


def cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    revoked = ProjectStore(_connect(settings)).revoke(args.prefix)
    _emit({"prefix": args.prefix, "revoked": revoked})
    return 0 if revoked else 1


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    _emit([spec.public_dict() for spec in load_registry(settings.config_path)])
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """The fleet and the running batches: a table, or one JSON line with ``--json``."""
    from batchsvc.metrics.status import read_status, render

    report = read_status(_connect(settings), load_registry(settings.config_path).ids())
    if args.json:
        _emit(report.to_dict())
    else:
        sys.stdout.write(render(report, limit=args.batches))
        sys.stdout.flush()
    return 0


# -- the demo project ----------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    os.replace(tmp, path)


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values


def local_base_url(settings: Settings) -> str:
    """The API's base URL as seen from this host (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    return f"http://{host}:{settings.port}/v1"


def ensure_demo(settings: Settings, client: redis.Redis) -> dict[str, str]:
    """Create the demo project and key once; keep the key's plaintext only in a mode-0600 file
    under the data dir. Rewrites the file's base URL for the current port."""
    path = settings.data_dir / DEMO_FILE
    store = ProjectStore(client)
    known = _read_env_file(path)
    project_id, api_key = known.get("BATCHSVC_PROJECT_ID"), known.get("BATCHSVC_API_KEY")
    valid = False
    if project_id and api_key:
        try:
            store.authenticate(api_key, project_id)
            valid = True
        except BatchsvcError:
            valid = False
    if not valid:
        project, key = store.create_project(DEMO_PROJECT_NAME)
        project_id, api_key = project.id, key.api_key
    demo = {
        "BATCHSVC_BASE_URL": local_base_url(settings),
        "BATCHSVC_PROJECT_ID": str(project_id),
        "BATCHSVC_API_KEY": str(api_key),
    }
    _write_private(path, "".join(f"export {k}={v}\n" for k, v in demo.items()))
    return demo


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    _emit(ensure_demo(settings, _connect(settings)))
    return 0


# -- process launchers (the Procfile's lines) ----------------------------------------------


def _exec(
    argv: list[str], redis_url: str | None, extra_env: dict[str, str] | None = None
) -> int:  # pragma: no cover - replaces the process
    """Become ``argv``, with ``REDIS_URL`` set to ``redis_url`` (see :func:`_child_redis_url`)."""
    env = dict(os.environ, **_redis_env(redis_url), **(extra_env or {}))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


#: A Celery worker that died of an error is started again after this pause.
RESTART_PAUSE_S = 2.0


#: One supervised process: its command line and the environment variables it gets on top of
#: the launcher's own.
Child = tuple[list[str], dict[str, str]]


def _supervise(argv: list[str], redis_url: str | None, nice: int = 0) -> int:  # pragma: no cover
    """Run one Celery worker under :func:`_supervise_all`."""
    return _supervise_all([(argv, {})], redis_url, nice)


def _supervise_all(
    children: list[Child],
    redis_url: str | None,
    nice: int = 0,
    metrics: GroupExport | None = None,
) -> int:
    """Run Celery workers and start each again whenever it dies of an error.

    celery 5.7 / kombu 5.7 can die with "Unrecoverable error: AttributeError ... 'hostname'"
    when Redis goes away while the worker restores unacknowledged messages (seen here when
    Redis restarts). Under honcho one exited process stops every other one, so the launcher
    stays up as the workers' supervisor: SIGTERM and SIGINT end every worker (each gets one
    SIGTERM: a warm shutdown) and the launcher once all have exited; any other exit of a worker
    is a crash, followed by its restart. Each worker gets ``REDIS_URL=redis_url``, or under
    Sentinel (``None``) the launcher's own ``REDIS_SENTINELS`` variables
    (:func:`_child_redis_url`). ``nice`` lowers the CPU priority of the supervisor, which every
    worker it starts inherits (:func:`batchsvc.cpu_priority.lower_cpu_priority`). ``metrics`` is
    the launcher's metrics export (:mod:`batchsvc.metrics.exposition`): every worker writes into
    its directory, a worker that dies has its live gauges dropped, and it is closed at the end.
    Returns the first non-zero exit status of the last runs, or 0.
    """
    import signal
    import subprocess
    import time

    lower_cpu_priority(nice)

    base_env = dict(os.environ, **_redis_env(redis_url), **(metrics.child_env() if metrics else {}))
    stopping = False
    running: list[subprocess.Popen[bytes] | None] = [None] * len(children)

    def forward(_signum: int, _frame: object) -> None:
        # Always SIGTERM, a warm shutdown however often it comes. Ctrl-C in a terminal reaches
        # the workers too (they share the terminal's process group): forwarding that SIGINT
        # would be their second, which Celery takes for a cold shutdown that abandons the
        # running lines.
        nonlocal stopping
        stopping = True
        for proc in running:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def start(i: int) -> None:
        argv, extra_env = children[i]
        running[i] = subprocess.Popen(argv, env={**base_env, **extra_env})

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        for i in range(len(children)):
            start(i)
        restart_at: dict[int, float] = {}
        while True:
            if stopping:
                codes = [proc.wait() for proc in running if proc is not None]
                return next((code for code in codes if code), 0)
            now = time.monotonic()
            for i, proc in enumerate(running):
                if i in restart_at:
                    if now >= restart_at[i]:
                        del restart_at[i]
                        start(i)
                elif proc is not None and (code := proc.poll()) is not None:
                    _say(
                        f"batchsvc: {children[i][0][0]} exited with {code}; starting it again "
                        f"in {RESTART_PAUSE_S:.0f} s"
                    )
                    if metrics is not None:
                        metrics.process_exited(proc.pid)
                    restart_at[i] = now + RESTART_PAUSE_S
            time.sleep(0.1)
    finally:
        if metrics is not None:
            metrics.close()


def _bin(name: str) -> str:
    """A console script of this installation (next to the running interpreter)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def cmd_redis_server(settings: Settings, args: argparse.Namespace) -> int:
    if settings.redis_url or settings.redis_sentinel:
        _say(
            "REDIS_URL is set; not starting the embedded Redis."
            if settings.redis_url
            else "REDIS_SENTINELS is set; not starting the embedded Redis."
        )
        # Stay up so honcho does not stop the other processes.
        import signal

        signal.pause()
        return 0
    embedded_redis.exec_server(settings)
    return 0


def cmd_exec(settings: Settings, args: argparse.Namespace) -> int:
    command = [c for c in args.command if c != "--"]
    if not command:
        raise ConfigError("usage: batchsvc exec -- COMMAND [ARGS...]")
    return _exec(command, _child_redis_url(settings))


#: gunicorn's default access-log fields, then how long the request took in microseconds (from
#: the parsed request to the last byte written) and the ``x-request-id`` the client was given,
#: so the request behind a client's complaint can be found, and timed on the server's side.
ACCESS_LOG_FORMAT = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)sus %({x-request-id}o)s'
)


#: gunicorn's logger in ``batchsvc web``: its logs and the app's, rendered by batchsvc.logs.
GUNICORN_LOGGER = "batchsvc.api.gunicorn_logger.GunicornLogger"

#: The gunicorn configuration of ``batchsvc web``: its hooks serve the metrics from the master and
#: keep what a worker loaded out of the garbage collector's full collections.
GUNICORN_CONFIG = "python:batchsvc.api.gunicorn_config"


def _start_metrics(settings: Settings, kind: str) -> GroupExport | None:
    """The metrics export of this launcher (``None``: off, or its port is taken)."""
    from batchsvc.metrics import exposition  # prometheus_client: only for the launchers

    export = exposition.start_group_export(settings, kind, os.getpid())
    if export is not None:
        _say(f"{kind} metrics: {export.url}")
    return export


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    url = _child_redis_url(settings)
    load_registry(settings.config_path)  # fail now, with the config error, not per request
    client = _connect(settings, wait_s=60)
    client.ping()  # Redis up (or reachable) before gunicorn starts taking requests
    demo = ensure_demo(settings, client) if settings.demo_enabled else None
    base_url = local_base_url(settings)
    metrics_env: dict[str, str] = {}
    if settings.metrics_enabled:
        from batchsvc.metrics import exposition

        # Named after this pid, which gunicorn's master keeps (exec): its hooks find it there.
        directory = exposition.prepare_group_dir(settings, "web", os.getpid())
        metrics_env[exposition.MULTIPROC_ENV] = str(directory)
    _say(
        "\n".join(
            [
                "",
                "batchsvc is up",
                f"  base URL:     {base_url}",
                f"  batches page: {base_url.removesuffix('/v1')}/ui",
                *(
                    [
                        f"  project id:   {demo['BATCHSVC_PROJECT_ID']}",
                        f"  API key:      {demo['BATCHSVC_API_KEY']}",
                        f"  (kept in {settings.data_dir / DEMO_FILE}; "
                        f"`. {settings.data_dir / DEMO_FILE}` exports them)",
                    ]
                    if demo
                    else ["  (no demo project: BATCHSVC_DEMO=false)"]
                ),
                *(
                    [
                        f"  metrics:     http://{settings.metrics_host}:"
                        f"{settings.metrics_listen_port}/metrics (operators only)"
                    ]
                    if settings.metrics_enabled
                    else []
                ),
                "",
            ]
        )
    )
    return _exec(
        [
            _bin("gunicorn"),
            "--bind",
            f"{settings.host}:{settings.port}",
            "--worker-class",
            "gthread",
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads),
            # Above the longest model timeout: the sync endpoint waits for its model.
            "--timeout",
            "660",
            "--graceful-timeout",
            "30",
            "--access-logfile",
            "-",
            "--access-logformat",
            ACCESS_LOG_FORMAT,
            "--no-control-socket",
            "--logger-class",
            GUNICORN_LOGGER,
            "--config",
            GUNICORN_CONFIG,
            "batchsvc.api:create_app()",
        ],
        url,
        metrics_env,
    )


def control_nodes(launcher_pid: int, host: str) -> tuple[str, str]:
    """Celery node names of the two workers ``batchsvc control`` (pid ``launcher_pid``)
    starts: the dispatcher, then the control worker."""
    return f"dispatch-{launcher_pid}@{host}", f"control-{launcher_pid}@{host}"


def cmd_control(settings: Settings, args: argparse.Namespace) -> int:
    url = _child_redis_url(settings)
    load_registry(settings.config_path)  # a bad config stops the worker now, with its message
    dispatch_node, control_node = control_nodes(os.getpid(), socket.gethostname())

    def worker(queue: str, node: str, concurrency: int) -> Child:
        argv = [
            _bin("celery"),
            "-A",
            "workers.main",
            "worker",
            "-Q",
            queue,
            "-P",
            "threads",
            "-c",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "-E",
            "-n",
            node,
            "-l",
            settings.log_level,
        ]
        return argv, {}

    # The dispatcher is a process of its own: a start or an assembly can hold every thread of
    # the control worker for seconds, and a model whose window waits on them idles its GPUs.
    return _supervise_all(
        [
            worker(DISPATCH_QUEUE, dispatch_node, 2),
            worker(CONTROL_QUEUE, control_node, args.concurrency),
        ],
        url,
        nice=settings.batch_nice,
        metrics=_start_metrics(settings, "control"),
    )


def inference_nodes(launcher_pid: int, processes: int, host: str) -> list[str]:
    """Celery node names of the workers ``batchsvc worker`` (pid ``launcher_pid``) starts: the
    plain name for one process, numbered ones for several."""
    if processes == 1:
        return [f"inference-{launcher_pid}@{host}"]
    return [f"inference-{launcher_pid}.{i}@{host}" for i in range(1, processes + 1)]


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    url = _child_redis_url(settings)
    registry = load_registry(settings.config_path)
    served = registry.select(list(settings.worker_models)) if settings.worker_models else registry
    if not len(served):
        raise ConfigError("no models to serve: configure at least one model")
    # Sync queues first: the worker serves them ahead of batch lines (see workers.celery_app).
    queues = [m.sync_queue for m in served] + [m.queue for m in served]
    layout = settings.worker_layout(os.cpu_count() or 1)
    _say(
        f"inference worker: {', '.join(served.ids())} x{settings.worker_concurrency}"
        + (
            f" in {len(layout)} processes ({'+'.join(map(str, layout))} threads)"
            if len(layout) > 1
            else ""
        )
    )
    nodes = inference_nodes(os.getpid(), len(layout), socket.gethostname())
    children: list[Child] = []
    for node, threads in zip(nodes, layout, strict=True):
        argv = [
            _bin("celery"),
            "-A",
            "workers.main",
            "worker",
            "-Q",
            ",".join(queues),
            "-P",
            "threads",
            "-c",
            str(threads),
            "--prefetch-multiplier",
            "1",
            "-E",
            "-n",
            node,
            "-l",
            settings.log_level,
        ]
        # Each process's settings name its own thread count, not the worker's total.
        children.append((argv, {"CONCURRENCY": str(threads)}))
    return _supervise_all(
        children, url, nice=settings.batch_nice, metrics=_start_metrics(settings, "worker")
    )


def cmd_beat(settings: Settings, args: argparse.Namespace) -> int:
    url = _child_redis_url(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return _exec(
        [
            _bin("celery"),
            "-A",
            "workers.main",
            "beat",
            "-s",
            str(settings.data_dir / "celerybeat-schedule"),
            "-l",
            settings.log_level,
        ],
        url,
    )


def cmd_flower(settings: Settings, args: argparse.Namespace) -> int:
    url = _child_redis_url(settings)
    return _exec(
        [
            _bin("celery"),
            "-A",
            "workers.main",
            "flower",
            "--address=127.0.0.1",  # never on the network: its task view shows prompts
            f"--port={settings.port}",
            "--persistent=False",
        ],
        url,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchsvc", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)
    add_client_commands(sub)

    projects = sub.add_parser("projects", help="manage projects").add_subparsers(
        dest="action", required=True
    )
    create = projects.add_parser("create", help="create a project and its first key")
    create.add_argument("--name", required=True)
    create.add_argument("--models", help="comma-separated model ids (default: all)")
    create.add_argument(
        "--weight",
        type=int,
        default=1,
        help="its share of each model against other busy projects (integer >= 1, default 1)",
    )
    create.set_defaults(func=cmd_projects_create)
    update = projects.add_parser("update", help="change a project's weight")
    update.add_argument("project_id")
    update.add_argument("--weight", type=int, required=True, help="integer >= 1")
    update.set_defaults(func=cmd_projects_update)
    projects.add_parser("list", help="list projects").set_defaults(func=cmd_projects_list)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    kcreate = keys.add_parser("create", help="issue another key for a project")
    kcreate.add_argument("--project", required=True)
    kcreate.set_defaults(func=cmd_keys_create)
    klist = keys.add_parser(
        "list",
        help="list keys by prefix: project, created_at, status (active or revoked), revoked_at, "
        "last_used_at (to the minute)",
    )
    klist.add_argument("project", nargs="?", help="only this project's keys")
    klist.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke the key(s) with this 12-character prefix")
    revoke.add_argument("prefix")
    revoke.set_defaults(func=cmd_keys_revoke)

    models = sub.add_parser("models", help="the model registry").add_subparsers(
        dest="action", required=True
    )
    models.add_parser("list", help="print the registry").set_defaults(func=cmd_models_list)

    status = sub.add_parser(
        "status",
        help="workers, queues and pending lines per model, and the running batches",
    )
    status.add_argument("--json", action="store_true", help="print one JSON line instead")
    status.add_argument(
        "--batches", type=int, default=50, help="most batches the table lists (default 50)"
    )
    status.set_defaults(func=cmd_status)

    sub.add_parser("demo", help="ensure the demo project; print it").set_defaults(func=cmd_demo)
    sub.add_parser("redis-server", help="run the embedded Redis").set_defaults(
        func=cmd_redis_server
    )
    web = sub.add_parser("web", help="run the API under gunicorn")
    web.add_argument("--workers", type=int, default=2)
    web.add_argument("--threads", type=int, default=16)
    web.set_defaults(func=cmd_web)
    control = sub.add_parser("control", help="run the control worker")
    control.add_argument("--concurrency", type=int, default=4)
    control.set_defaults(func=cmd_control)
    sub.add_parser("worker", help="run an inference worker (MODELS, CONCURRENCY)").set_defaults(
        func=cmd_worker
    )
    sub.add_parser("beat", help="run celery beat (the sweeps)").set_defaults(func=cmd_beat)
    sub.add_parser("flower", help="run Flower on 127.0.0.1").set_defaults(func=cmd_flower)
    ex = sub.add_parser(
        "exec",
        help="run a command with REDIS_URL set to this installation's (under Sentinel, with "
        "the REDIS_SENTINELS variables it has)",
    )
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.func(settings, args))
    except BatchsvcError as exc:
        _say(f"batchsvc: {exc.message}")
        return 2
    except redis.RedisError as exc:
        _say(f"batchsvc: cannot reach Redis: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
