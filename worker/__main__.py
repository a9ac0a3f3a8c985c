"""`python -m worker`: the entry point of one worker process, started by the arbiter."""

import sys

from .process import main

sys.exit(main())
