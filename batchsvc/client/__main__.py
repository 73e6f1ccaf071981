"""``python -m batchsvc.client ARGS``: the client commands alone, as ``batchsvc ARGS``."""

import sys

from batchsvc.client import main

if __name__ == "__main__":  # pragma: no cover - imported by module discovery, run by -m
    sys.exit(main())
