"""Side-by-side benchmarks of fleetd against Celery, RQ, Dramatiq, Huey, SAQ and arq."""
