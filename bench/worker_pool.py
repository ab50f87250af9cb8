"""What bench/generate_speed.py and bench/generate_causal.py share: every path of a generation
benchmark in a worker process of its own, and rounds that time the paths in turn.

One process per path, and only one computing at a time: in one process, torch's and
CTranslate2's thread pools fight for the cores (measured on a 2-core machine with 2 threads
each: CTranslate2 float32 greedy at batch 1 fell from 1,330 to 140 tokens/s once torch had
generated in the same process).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class WorkerPool:
    """One spawned process per path, running ``target(conn, name, model_dir, threads)``, which
    loads its model, sends "ready", then answers each request sent to it until sent None."""

    def __init__(self, target: Callable[..., None], model_dirs: dict[str, str],
                 threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: dict[str, Any] = {}
        self.processes = []
        for name, model_dir in model_dirs.items():
            here, there = context.Pipe()
            process = context.Process(target=target, args=(there, name, model_dir, threads),
                                      daemon=True)
            process.start()
            self.connections[name] = here
            self.processes.append(process)
        for name, connection in self.connections.items():
            if connection.recv() != "ready":
                raise RuntimeError(f"the worker of {name} did not start")

    def run(self, name: str, request: Any) -> Any:
        """Send ``request`` to the worker of ``name`` and return its answer."""
        self.connections[name].send(request)
        return self.connections[name].recv()

    def close(self) -> None:
        for connection in self.connections.values():
            connection.send(None)
        for process in self.processes:
            process.join()


def rotations(paths: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, path) for ``rounds`` rounds, each timing every path once; the path that goes
    first rotates, so that the machine's drifting load falls on every path alike."""
    for r in range(rounds):
        start = r % len(paths)
        for name in [*paths[start:], *paths[:start]]:
            yield r, name
