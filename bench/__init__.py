"""Side-by-side benchmarks of fleetd against Celery, RQ, Dramatiq and Huey (`python -m bench`)."""
