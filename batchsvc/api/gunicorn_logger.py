"""gunicorn's logger for ``batchsvc web`` (``--logger-class``): gunicorn's error and access logs,
and every record of the Flask app, rendered by :mod:`batchsvc.logs`.

gunicorn installs its own handlers on ``gunicorn.error`` and ``gunicorn.access``, in the master
and again in every worker it boots; this class lets it, then swaps their formatter for ours and
puts our handler on the root logger, where the app's loggers end up. The access log keeps what
``ACCESS_LOG_FORMAT`` gives it: in ``json`` its atoms become fields (``duration_us``,
``request_id``...), in ``console`` it stays gunicorn's line.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from batchsvc import logs
from batchsvc.settings import Settings


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        settings = Settings.from_env()
        logs.configure(settings)
        rendered = logs.formatter(settings.log_format)
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(rendered)
