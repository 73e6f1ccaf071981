"""Authentication (spec section 2, open points 1 to 3).

``x-api-key`` + ``x-project-id``; with no ``x-api-key``, ``Authorization: Bearer <key>`` works as
an extension (the stock OpenAI SDK then needs no extra headers) and the project comes from the
key. When ``x-api-key`` is present the bearer value is ignored: the documented SDK setup sends a
placeholder there.
"""

from __future__ import annotations

from flask import g, request

from batchsvc import logs
from batchsvc.api.services import services
from batchsvc.errors import AuthenticationMissing
from batchsvc.projects import Project


def authenticate_request() -> None:
    """``before_request`` hook: set ``g.project`` or raise 401/403. CORS preflights pass."""
    if request.method == "OPTIONS" or not request.path.startswith("/v1/"):
        return
    g.project = project_of_request()
    logs.bind(project_id=g.project.id)


def project_of_request() -> Project:
    """The project of the current request's key, by the rules above (the batches page's
    fragments authenticate with it too).

    Raises:
        AuthenticationMissing: no key (401).
        InvalidCredentials: unknown or revoked key, or a key of another project (403).
    """
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


def current_project() -> Project:
    project: Project = g.project
    return project
