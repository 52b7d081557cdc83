"""python -m bench.capacity: see bench/capacity/__init__.py."""

import sys

from bench.capacity.run import main

sys.exit(main())
