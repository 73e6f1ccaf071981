"""The domain rule (STYLE point 1): batchsvc's domain modules import neither Flask nor Celery.

Only the web edge (``batchsvc.api``) and the CLI may. The check runs in a fresh
interpreter, because this test process has long since imported Flask and Celery.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import batchsvc

DOMAIN_MODULES = [
    "batchsvc.settings",
    "batchsvc.errors",
    "batchsvc.ids",
    "batchsvc.lifecycle",
    "batchsvc.jsonl",
    "batchsvc.tokens",
    "batchsvc.models_config",
    "batchsvc.queues",
    "batchsvc.projects",
    "batchsvc.files",
    "batchsvc.batches",
    "batchsvc.paging",
    "batchsvc.results",
    "batchsvc.finalize",
    "batchsvc.storage",
    "batchsvc.storage.local",
    "batchsvc.celery_config",
    "batchsvc.embedded_redis",
    "batchsvc.idempotency",
]
#: Allowed to import Flask/Celery: the web edge and the CLI.
EDGE = ("batchsvc.api", "batchsvc.cli")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'celery'))))
"""


def discovered_domain_modules() -> set[str]:
    """Every module of batchsvc outside the edge, found without importing anything."""
    found: set[str] = set()
    pending = [(list(batchsvc.__path__), "batchsvc.")]
    while pending:
        path, prefix = pending.pop()
        for info in pkgutil.iter_modules(path, prefix):
            if info.name.startswith(EDGE):
                continue
            found.add(info.name)
            if info.ispkg:
                sub = Path(path[0]) / info.name.rsplit(".", 1)[-1]
                pending.append(([str(sub)], info.name + "."))
    return found


def test_every_listed_domain_module_exists() -> None:
    assert set(DOMAIN_MODULES) <= discovered_domain_modules()


def test_domain_modules_load_neither_flask_nor_celery() -> None:
    # Given every listed domain module, plus any added since the list was written
    modules = sorted(set(DOMAIN_MODULES) | discovered_domain_modules())
    root = Path(batchsvc.__file__).resolve().parent.parent
    # When a fresh interpreter imports them all
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
        check=False,
    )
    # Then neither flask nor celery was loaded
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
