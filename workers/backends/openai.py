"""The ``openai`` backend: any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp,
Ollama, OpenAI itself).

One call of :meth:`OpenAIBackend.complete` is one batch line (or one sync request): it POSTs the
body to ``{base_url}/chat/completions`` and retries transient failures inside the call, so the
Celery task around it never needs to retry and a line's ``batch_req_`` id stays the same across
attempts (spec 9.3). The work is split three ways, and this module only joins them:

- :mod:`workers.backends.transport`: kept-alive connections, proxies, the CA bundle, one POST;
- :mod:`workers.backends.outcomes`: an answer (or a transport error) classified as a completion,
  a retryable failure or a final spec 9.3 error;
- :mod:`batchsvc.retry`: the one retry policy, here :data:`UPSTREAM_RETRY` with the model's
  ``max_attempts`` and ``timeout_s`` per attempt. The backoff before attempt ``k + 1`` is
  ``min(30, 2 ** (k - 1))`` seconds with equal jitter; a ``Retry-After`` on a retried answer
  raises the wait to what the server asked for, still capped at 30 s.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from batchsvc import logs
from batchsvc.errors import BackendUnavailable, ConfigError, UpstreamCredentialsRejected
from batchsvc.metrics import instruments
from batchsvc.models_config import ModelSpec
from batchsvc.retry import RetryPolicy
from workers.backends import BackendResponse, transport
from workers.backends.completions import compact_json
from workers.backends.outcomes import classify, exhausted, failure_of

__all__ = ["UPSTREAM_RETRY", "OpenAIBackend", "attempt_status"]

log = logs.get_logger("batchsvc.upstream")

#: 1 s base, 30 s cap, equal jitter; each model sets its own number of attempts.
UPSTREAM_RETRY = RetryPolicy(base_s=1.0, cap_s=30.0, jitter="equal")


class OpenAIBackend:
    """A :class:`~workers.backends.ChatBackend` for an OpenAI-compatible server.

    Args:
        spec: the model this backend serves (its ``base_url`` must be set).
        client: the transport client every request goes through, as given (its own proxy, or
            none: the environment's proxy settings are then not read). Default: the process's
            shared client, through the proxy the environment names for ``base_url``.
        sleep: how to wait between attempts (tests pass a recorder).
        rand: a uniform ``[0, 1)`` source for the jitter.
        environ: where ``spec.api_key_env`` is read, at each call (so a rotated key applies),
            and the CA bundle, once.

    Raises:
        ConfigError: no ``base_url``, one that is not http(s), or a proxy that is not http(s).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        client: transport.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.spec = spec
        self._use_env_proxy = client is None
        self._client = client if client is not None else transport.default_client()
        self._sleep = sleep
        self._rand = rand
        self._environ = environ
        # What requests' trust_env looked up on every call, once: the proxy for this model's
        # host and the CA bundle.
        self._route = self._route_for(spec)

    @property
    def proxy_url(self) -> str | None:
        """The proxy this backend's requests go through (``None``: direct)."""
        return self._route.proxy_url

    def _route_for(self, spec: ModelSpec) -> transport.Route:
        if not spec.base_url:
            raise ConfigError(f'model "{spec.id}": the openai backend needs a base_url')
        return transport.route_for(
            spec.id, spec.base_url, self._environ, use_proxy=self._use_env_proxy
        )

    def complete(
        self, spec: ModelSpec, body: dict[str, Any], prompt_tokens: int
    ) -> BackendResponse:
        """Run one chat completion, retrying as :mod:`workers.backends.outcomes` says.

        ``prompt_tokens`` is not used: the upstream reports its own usage, passed through.

        Raises:
            LineError: the line's final failure, with its spec 9.3 code.
        """
        route = self._route
        if spec.base_url != route.base_url:  # a spec other than the one this backend was built for
            route = self._route_for(spec)
        headers = self._headers(spec)
        payload = dict(body)  # shallow copy: the caller's dict is never changed
        payload["model"] = spec.upstream_name
        data = compact_json(payload).encode("utf-8")
        timeout = transport.timeout_for(spec.timeout_s)

        def attempt() -> BackendResponse:
            try:
                response = self._client.post(route, data, headers, timeout)
            except transport.TransportError as exc:
                failure = failure_of(exc, timeout)
                instruments.upstream_attempt(spec.id, attempt_status(failure))
                raise failure from exc
            instruments.upstream_attempt(spec.id, str(response.status))
            return classify(spec, response)

        def log_retry(failure: BaseException, failed: int, delay: float) -> None:
            instruments.upstream_retry(spec.id, attempt_status(failure))
            # Per line, so DEBUG: batchsvc_upstream_retries_total counts them at any level.
            log.debug(
                "upstream attempt failed; retrying",
                attempt=failed,
                max_attempts=spec.max_attempts,
                failure=str(failure),
                delay_s=round(delay, 3),
            )

        policy = UPSTREAM_RETRY.with_attempts(spec.max_attempts)
        try:
            return policy.call(
                attempt,
                retry_on=(BackendUnavailable,),
                sleep=self._sleep,
                rand=self._rand,
                on_retry=log_retry,
            )
        except BackendUnavailable as failure:
            raise exhausted(failure, policy.max_attempts or 1) from None

    def _headers(self, spec: ModelSpec) -> dict[str, str]:
        headers = {
            "User-Agent": "batchsvc",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if spec.api_key_env:
            key = self._environ.get(spec.api_key_env)
            if not key:
                raise UpstreamCredentialsRejected(
                    "api_key_unavailable",
                    f'The upstream API key of model "{spec.id}" is unavailable: '
                    f"environment variable {spec.api_key_env} is not set",
                    upstream_status=None,
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers


def attempt_status(failure: BaseException) -> str:
    """An attempt's outcome as the metrics label it: the HTTP status answered, else
    ``timeout`` or ``connection_error``."""
    if isinstance(failure, BackendUnavailable):
        if failure.upstream_status is not None:
            return str(failure.upstream_status)
        return "timeout" if failure.timed_out else "connection_error"
    return "error"
