"""python -m bench.server_bench: see bench/server_bench/__init__.py."""

import sys

from bench.server_bench.run import main

sys.exit(main())
