"""`python -m worker`: the entry point of one worker process, started by the arbiter."""

import contextlib
import logging
import os
import sys

from .process import main

code = main()
# Whatever the worker owed the broker and the arbiter is sent by now. Leave without the
# interpreter's teardown of its heap: tens of ms of CPU, taken on a reload from the new
# generation serving the queues. (Task code runs in the children, which exit this way too.)
logging.shutdown()
for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError, ValueError):  # a full disk, a closed stream: not our exit
        stream.flush()
os._exit(code)
