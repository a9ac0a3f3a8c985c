"""Example tasks for `make run` and `make demo`.

Try: `fleetctl -c config/example.toml submit examples.tasks.add 1 2 --wait 5`
"""

import random
import time

from fleetd import task


@task
def add(a: int, b: int) -> int:
    return a + b


@task(queue="images", time_limit=30, soft_time_limit=20)
def resize(photo_id: int) -> str:
    time.sleep(random.uniform(0.005, 0.05))
    return f"photo {photo_id} resized"


@task(rate_limit="100/s")
def send_email(to: str) -> str:
    return f"sent to {to}"
