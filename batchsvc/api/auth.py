"""Authentication (spec section 2, open points 1 to 3).

``x-api-key`` + ``x-project-id``; with no ``x-api-key``, ``Authorization: Bearer <key>`` works as
an extension (the stock OpenAI SDK then needs no extra headers) and the project comes from the
key. When ``x-api-key`` is present the bearer value is ignored: the documented SDK setup sends a
placeholder there.

Every request that authenticates as a project is then counted against the project's request
rate limit (``BATCHSVC_RATE_LIMIT``, :mod:`batchsvc.rate_limit`): a request refused with 401
or 403 is never counted, nor is anything that does not authenticate (health, the OpenAPI
document, the page shell, CORS preflights). The batches page's fragments authenticate as the
project, so they count too: they read the same Redis data as the API (the models fragment
more than most endpoints), and leaving them out would give every key an unlimited side door.
The page polls two fragments every 2 s, 60 requests a minute per open tab: 1% of the default
limit; when the project is over it, the page shows the 429's message and polls on.
"""

from __future__ import annotations

from flask import current_app, g, request

from batchsvc import logs
from batchsvc.api.errors import store_unavailable
from batchsvc.api.services import services
from batchsvc.errors import AuthenticationMissing, RateLimited
from batchsvc.projects import Project
from batchsvc.rate_limit import RequestRateLimiter

log = logs.get_logger("batchsvc.api")

#: Where ``create_app`` keeps the app's :class:`RequestRateLimiter` (``None``: no limit).
RATE_LIMITER = "batchsvc.rate_limiter"


def authenticate_request() -> None:
    """``before_request`` hook: set ``g.project`` or raise 401/403. CORS preflights pass."""
    if request.method == "OPTIONS" or not request.path.startswith("/v1/"):
        return
    g.project = project_of_request()


def project_of_request() -> Project:
    """The project of the current request's key, by the rules above, with the request counted
    against its rate limit (the batches page's fragments authenticate with it too).

    Raises:
        AuthenticationMissing: no key (401).
        InvalidCredentials: unknown or revoked key, or a key of another project (403).
        RateLimited: the project is over its request rate limit (429).
    """
    project = _authenticate()
    logs.bind(project_id=project.id)
    _count_request(project)
    return project


def _authenticate() -> Project:
    svc = services()
    api_key = request.headers.get("x-api-key")
    project_id = request.headers.get("x-project-id") or None
    if api_key:
        if project_id is None and svc.settings.require_project_header:
            raise AuthenticationMissing()
    else:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationMissing()
        api_key = token.strip()
    return svc.projects.authenticate(api_key, project_id)


def _count_request(project: Project) -> None:
    """Count the request against the project's rate limit.

    Redis failing here answers as it does anywhere else (503 ``redis_unavailable``, by the
    error handlers). Any other failure of the limiter (a bug, an unexpected reply) lets the
    request through, logged: the limiter guards the service and must never be what breaks it.
    """
    limiter: RequestRateLimiter | None = current_app.extensions.get(RATE_LIMITER)
    if limiter is None:
        return
    try:
        limiter.hit(project.id)
    except RateLimited:
        raise
    except Exception as exc:
        if store_unavailable(exc):
            raise
        log.exception("rate limit check failed: request let through")


def current_project() -> Project:
    project: Project = g.project
    return project
