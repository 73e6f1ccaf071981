"""The Celery entry point (``celery -A workers.main ...``): the only module that reads the
environment at import time."""

from batchsvc.embedded_redis import resolve_url
from batchsvc.settings import Settings
from workers.celery_app import make_celery

settings = Settings.from_env()
app = make_celery(settings, resolve_url(settings))
