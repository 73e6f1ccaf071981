"""Prometheus metrics: what batchsvc's processes record, how each launcher serves them, and the
fleet's state read from Redis at scrape time.

- :mod:`batchsvc.metrics.instruments`: the counters, histograms and gauges recorded where things
  happen (a line recorded, an upstream attempt, an assembly, an API request), a few in-process
  updates each: no Redis round trip is ever made for a metric;
- :mod:`batchsvc.metrics.fleet`: one read of the fleet's state in Redis (workers and their
  concurrency, queue depths, pending and in-flight lines, windows, active batches), shared by
  the scrape-time collector and ``batchsvc status``;
- :mod:`batchsvc.metrics.collector`: that read as Prometheus gauges;
- :mod:`batchsvc.metrics.exposition`: prometheus_client's multiprocess mode, one directory and
  one loopback listener per launcher (``batchsvc web``, ``control``, ``worker``);
- :mod:`batchsvc.metrics.gunicorn_hooks`: the listener of ``batchsvc web``, in gunicorn's master;
- :mod:`batchsvc.metrics.status`: ``batchsvc status``'s table.

Nothing here imports Flask or Celery, and nothing is imported by this package itself: the
gunicorn master must not create metric values of its own.
"""
