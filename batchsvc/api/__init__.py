"""The Flask app factory. The API stores records and files and enqueues work; it never does
heavy work in a request and never imports the workers.

Every request is counted and timed by method, URL rule and status
(:mod:`batchsvc.metrics.instruments`); the metrics are served by gunicorn's master on a
listener of their own (:mod:`batchsvc.metrics.gunicorn_hooks`), never on the API's port.

Limits against abuse: every request's body is capped before anything reads it
(:func:`_cap_request_bodies`), and every request that authenticates as a project counts against
the project's request rate limit (:mod:`batchsvc.api.auth`, :mod:`batchsvc.rate_limit`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider

from batchsvc.api import auth, batches, chat, files, health, openapi, page, uploads
from batchsvc.api.dispatch import CeleryDispatcher, Dispatcher
from batchsvc.api.errors import body_too_large, register_error_handlers
from batchsvc.api.services import Services
from batchsvc.batches import BatchStore
from batchsvc.embedded_redis import resolve_url
from batchsvc.files import FileStore
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelRegistry, load_registry
from batchsvc.projects import ProjectStore
from batchsvc.rate_limit import RequestRateLimiter
from batchsvc.redis_connect import connect
from batchsvc.settings import Settings
from batchsvc.storage import Storage, open_storage


def create_app(
    settings: Settings | None = None,
    *,
    redis_client: redis.Redis | None = None,
    storage: Storage | None = None,
    dispatcher: Dispatcher | None = None,
    registry: ModelRegistry | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    settings = settings or Settings.from_env()
    if redis_client is None or dispatcher is None:
        redis_client = redis_client or connect(settings, health_check_interval=30)
        dispatcher = dispatcher or CeleryDispatcher(settings, resolve_url(settings))
    app = Flask("batchsvc")
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    json_provider = app.json  # typed as the base JSONProvider: the class is configurable
    assert isinstance(json_provider, DefaultJSONProvider)
    json_provider.sort_keys = False
    json_provider.ensure_ascii = False
    app.extensions["batchsvc"] = Services(
        settings=settings,
        redis=redis_client,
        storage=storage or open_storage(settings),
        projects=ProjectStore(redis_client, clock),
        files=FileStore(redis_client, retention_s=settings.file_retention_s, clock=clock),
        batches=BatchStore(redis_client, clock),
        registry=registry or load_registry(settings.config_path),
        dispatcher=dispatcher,
        clock=clock,
    )
    app.extensions[auth.RATE_LIMITER] = (
        RequestRateLimiter(redis_client, settings.rate_limit)
        if settings.rate_limit is not None
        else None
    )
    instruments.set_enabled(settings.metrics_enabled)
    # First, so the clock starts before any other hook (one may answer on its own).
    _time_requests(app)
    register_error_handlers(app)
    # Before authentication: an oversized body is refused before the request costs anything.
    _cap_request_bodies(app, settings.max_body_bytes)
    app.before_request(auth.authenticate_request)
    app.register_blueprint(files.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(page.bp)
    return app


def _cap_request_bodies(app: Flask, max_body_bytes: int) -> None:
    """413 for a request body over its endpoint's cap, on every endpoint: ``max_body_bytes``
    (``BATCHSVC_MAX_BODY_BYTES``), or the upload's own cap on ``POST /v1/files``
    (:func:`batchsvc.api.uploads.max_request_bytes`).

    A ``Content-Length`` over the cap is answered at once, without reading a byte of the body.
    gunicorn then drains a little of what the client keeps sending (at most 64 KiB or 5 s; it
    ignores a ``Connection: close`` from the app) and closes the connection gracefully: the
    client still reads the 413 rather than a reset, and a client that announced 10 GB and went
    silent holds a worker thread for those 5 s at most.

    A body without ``Content-Length`` (chunked; gunicorn terminates the stream and says so,
    ``wsgi.input_terminated``) is read through werkzeug's ``LimitedStream``, capped by
    ``request.max_content_length``:

    - an upload is streamed; the stream raises ``RequestEntityTooLarge`` on the first read past
      the cap, which the error handlers answer with the same 413;
    - any other body is read here, whole, up to one byte past the cap: a JSON body is read
      whole by its view anyway, and werkzeug's ``get_data`` would cut one longer than the cap
      silently (reading exactly to a maximum is not an error to it) and hand the view a
      truncated body. The views then get the cached bytes.
    """

    @app.before_request
    def cap_request_body() -> None:
        upload = request.endpoint == uploads.UPLOAD_ENDPOINT
        limit = uploads.max_request_bytes() if upload else max_body_bytes
        g.body_limit = limit
        length = request.content_length
        if length is not None:
            if length > limit:
                raise body_too_large(limit)
            return
        if upload:
            request.max_content_length = limit
        else:
            request.max_content_length = limit + 1
            if len(request.get_data(cache=True)) > limit:
                raise body_too_large(limit)


#: Methods counted under their own name; any other (a client may send anything) is ``other``.
_METHODS = frozenset({"GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH"})


def _time_requests(app: Flask) -> None:
    """Count and time every request by method, URL rule (``/v1/batches/<batch_id>``, never the
    raw path: ids would make a series per batch) and status. A streamed download is timed to
    its first byte."""

    @app.before_request
    def start_clock() -> None:
        g.started_at = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        started = g.get("started_at")
        if started is not None:
            rule = request.url_rule
            instruments.http_request(
                request.method if request.method in _METHODS else "other",
                rule.rule if rule is not None else "unmatched",
                response.status_code,
                time.perf_counter() - started,
            )
        return response
