"""A Lua script for the hot path: one ``EVALSHA`` on a pooled connection, packed by hiredis.

Every batch line runs two scripts (:meth:`batchsvc.batches.BatchStore.begin_line` and
``finish_line``). redis-py's :class:`~redis.commands.core.Script` reaches Redis through its whole
command layer: the deprecation wrapper, the client's retry object, the observability hooks,
and an argument encoder written in Python that encodes each key and argument one by one
before hiredis packs them. Timed alone on this VM (``EVALSHA`` of a seven-key script, embedded
Redis), that layer is a third of the call's CPU: 186-208 µs a call through ``Script``, 118-120 µs
through :class:`LeanScript`. In a profile of B1's worker (issue 17; RESULTS.md, session 11)
the line's two scripts went from 0.53 to 0.23 ms of CPU per line.

What stays redis-py's: the connection pool (so Sentinel's pool still finds the primary at each
checkout, and a connection is health-checked as configured), the connection, its reply
parser, error replies as exceptions, and loading the script on ``NOSCRIPT``. What is left out
is the client's own retry: a dropped connection is closed and the error raised at once.

- A line's two scripts are retried as a whole by their caller
  (:func:`workers.redis_retry.retry_redis`), with the same lease token; they are written to
  be run twice.
- Batch fetch's script (:mod:`workers.redis_transport`) raises into kombu's consumer, which
  reconnects. Messages the script took before its reply was lost stay in kombu's unacked hash,
  and come back as any unacked message does. redis-py's own retry of the script would have
  left them there too, and taken more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.exceptions import DataError, NoScriptError, ResponseError

#: What a key or an argument may be: what hiredis packs (a bool or None is refused, as
#: redis-py's encoder refuses them).
Arg = str | bytes | int | float


class LeanScript:
    """Call a Lua script as ``script(keys=[...], args=[...])``, like redis-py's ``Script``."""

    def __init__(self, client: redis.Redis, text: str) -> None:
        self.client = client
        #: redis-py's script: its SHA, its text, and its load on NOSCRIPT.
        self.script = client.register_script(text)

    def __call__(self, keys: Sequence[str | bytes] = (), args: Sequence[Arg] = ()) -> Any:
        if self.client.connection is not None:
            # A single-connection client holds its connection under its own lock: redis-py's
            # path is the only safe one there.
            return self.script(keys=keys, args=args)
        try:
            return self._evalsha(keys, args)
        except NoScriptError:
            # Redis restarted or its scripts were flushed: load once, as Script does.
            self.script.sha = self.client.script_load(self.script.script)
            return self._evalsha(keys, args)

    def _evalsha(self, keys: Sequence[str | bytes], args: Sequence[Arg]) -> Any:
        command: Any = ("EVALSHA", self.script.sha, len(keys), *keys, *args)
        try:
            # hiredis's stub types the tuple as one item long: hence the Any.
            packed = hiredis.pack_command(command)
        except TypeError as exc:
            raise DataError(str(exc)) from exc
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
            return conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is at a clean reply boundary
        except BaseException:
            # A timeout or a drop mid-reply leaves the connection's stream unknown.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)
