"""The benchmark suite of issue 6: is the GPU, not batchsvc, the bottleneck?

Run with ``make bench`` (everything, full sizes) or ``python -m benchmarks B1 --quick``; see
``python -m benchmarks --help``. Each benchmark starts its own real processes (the embedded
redis-server, the API under gunicorn, the control worker, inference workers, beat) with the
Procfile's ``batchsvc`` commands and the embedded defaults ``make run`` uses, under a temporary
data dir, and stops them when it ends. Never part of ``make test``.
"""
