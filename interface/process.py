"""Starting the engine process by module path, so that the server never imports the engine.

multiprocessing's 'spawn' pickles a target by reference: handing it `engine.worker.main` itself would
import the engine in the server. It gets `run_main` with the module's name instead; the child imports
that module and calls its `main` with the remaining arguments (a Pipe end pickles as usual).
"""

from __future__ import annotations

import importlib
from typing import Any

ENGINE_MODULE = "engine.worker"  # its main(conn, options: WorkerOptions dict) serves one server


def run_main(module: str, *args: Any) -> None:
    """The body of a spawned process: `module`.main(*args)."""
    importlib.import_module(module).main(*args)
