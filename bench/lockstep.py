"""Lock-step timing of training loops that each run in their own process, shared by the
training benchmarks (``train_throughput.py``, ``train_lm_throughput.py``).

The machine is shared, and its load moves by 2x within minutes; timing one side after the other
measures the load as much as the code. So the sides run *in turn, one step at a time*: at the
end of each step a side reports to the parent and blocks until its next turn (the turn order
alternates every round). A step is timed from the moment its side is released to the end of the
step, with only one side computing at a time. Set-up and the first step of every side overlap
and are never timed.

A side is a module-level function ``run(gate, **kwargs)`` that trains, calls ``gate.step_end()``
at the end of every optimizer step, and returns a picklable result (its figures).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
import warnings
from collections.abc import Callable

import torch


class Gate:
    """A side's end of the lock-step: at the end of each step, read the clock, report, and wait
    for the next turn. Step k is timed from the release after step k-1 to the end of step k."""

    def __init__(self, conn) -> None:
        self.conn, self.ends, self.releases = conn, [], []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.conn.send(("step", len(self.ends)))
        self.conn.recv()  # "go" (next step) or "finish"
        self.releases.append(time.perf_counter())

    def step_seconds(self, warmup: int) -> list[float]:
        return [self.ends[k] - self.releases[k - 1] for k in range(warmup, len(self.ends))]


def _child(conn, run: Callable, kwargs: dict) -> None:
    """Entry point of a side's process: run it behind a Gate, send back its result."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if os.environ.get("OMP_NUM_THREADS"):  # --threads, set by the parent
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        conn.send(("result", run(gate=Gate(conn), **kwargs)))
    except BaseException:  # report, never leave the parent waiting
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:  # the parent is gone (it stopped first)
            pass
    finally:
        conn.close()


def run_lockstep(sides: list[tuple[Callable, dict]], total_steps: int) -> list:
    """Start every side ``(run, kwargs)`` in its own process; after their first step, release
    them one step at a time, in turn (alternating the order every round); return their results,
    in the order of ``sides``."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no shared accelerate or torch state
    conns, procs = [], []
    for run, kwargs in sides:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, run, kwargs), daemon=True)
        proc.start()
        child.close()
        conns.append(parent)
        procs.append(proc)

    def expect(conn, kind: str):
        try:
            message = conn.recv()
        except EOFError:
            raise RuntimeError("a benchmark process died (see its output above)") from None
        if message[0] == "error":
            raise RuntimeError(f"a benchmark process failed:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a benchmark process, got {message!r}")
        return message[1]

    try:
        for conn in conns:  # set-up and step 1 of every side, concurrently (never timed)
            expect(conn, "step")
        for step in range(2, total_steps + 1):
            order = conns if step % 2 == 0 else conns[::-1]
            for conn in order:
                conn.send("go")
                expect(conn, "step")
        for conn in conns:
            conn.send("finish")
        results = [expect(conn, "result") for conn in conns]
    finally:  # on success the sides are finishing; on an error, closing wakes them (EOFError)
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(timeout=120)
            if proc.is_alive():
                proc.terminate()
    return results


def best_time(fn: Callable[[], object], reps: int = 3) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn`` after one warm-up call: the least
    disturbed by other processes on a shared machine (the profiles' per-piece timing)."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
