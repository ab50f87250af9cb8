"""``tformer serve`` under load: batching against the same model served one request at a time,
on loopback, with a bounded number of concurrent clients.

    .venv/bin/python bench/serve_load.py runs/multi30k/checkpoints/step-0002393
    .venv/bin/python bench/serve_load.py CHECKPOINT --clients 16 --requests 480 --max-new-tokens 32
    .venv/bin/python bench/serve_load.py --quick     # no checkpoint: trains a tiny model first (~1 min)
    .venv/bin/python bench/serve_load.py CHECKPOINT --openai   # streaming and the OpenAI route

Two servers, each a ``tformer serve`` subprocess on 127.0.0.1 (the load generator runs in this
process, with aiohttp's client), on the same checkpoint and the same device:

- **one at a time**: ``--max-batch-size 1``: every request is its own ``generate()`` call;
- **batching**: ``--max-batch-size`` = the number of clients, ``--max-wait-ms`` as given.

Both use ``--batching`` (auto: continuous for tformer's own model, else dynamic), so the only
difference between them is the batch size.

Scenarios, each after a warm-up of one request per client, taking turns in ``--rounds`` chunks
(in alternating order, both servers up all along, so that a change in the machine's background
load falls on all of them alike):

1. one at a time, 1 client: the single-request latency (the reference for p50/p99);
2. one at a time, N clients: the throughput of serving requests one by one;
3. batching, N clients: the throughput and latency with batches;
4. batching, 1 client: what batching costs when there is nothing to batch.

``--burst N`` adds, after them, N requests sent at once (one connection each) to each server,
``--rounds`` times, taking turns: the time until the last is answered (median), batching
against one at a time. That is a notebook or a batch job firing its requests together: the
server admits them as fast as it can encode them.

Every request holds one input text (Multi30k validation sources by default, cycled in the same
order in every scenario), greedy decoding, ``--max-new-tokens``. A client sends its next request
as soon as it has the answer to the last (closed loop). Latency is measured by the client, from
sending the request to reading the whole answer. The script checks that every request was
answered 200 and that each text got the same output in every scenario (batched equals one at a
time), and prints the ratios: throughput (3)/(2), goal >= 4; p99 (3)/(1), goal <= 2.

``--openai`` runs other scenarios (greedy, taking turns too): ``/v1/generate`` against
``/v1/completions`` (not streamed) at N clients on the batching server, the overhead of the
OpenAI route at the same load; and streaming clients of ``/v1/completions`` at 1 and N
clients, on the batching server and on the one-at-a-time one, measuring the time to the first
text chunk (TTFT) and the gaps between the chunks of an answer (inter-token latency), p50 and
p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
# The Multi30k validation split of the local mirror (tformer data): $TFORMER_DATA_DIR/multi30k/.
DEFAULT_INPUTS = Path(os.environ.get("TFORMER_DATA_DIR", "data")) / "multi30k" / "val.jsonl"


@dataclass
class Scenario:
    name: str
    clients: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: list[int]
    outputs: dict[str, str]
    errors: int
    output_tokens: list[int]
    client_cpu_s: float = 0.0  # CPU time of this process (the load generator)
    server_cpu_s: float = 0.0  # CPU time of the server process (Linux /proc; else 0)

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, round(q / 100 * (len(data) - 1)))]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live children (the batcher's
    process, with ``--batcher-process``); 0 where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return own + sum(process_cpu_seconds(child) for child in children)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``tformer serve`` subprocess on a free loopback port; stopped on exit."""

    def __init__(self, checkpoint: str, batch: int, wait_ms: float, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "tformer.cli", "serve", checkpoint,
                   "--port", str(self.port), "--max-batch-size", str(batch),
                   "--max-wait-ms", str(wait_ms), "--max-queue", "4096", "--timeout-s", "600",
                   "--max-new-tokens-cap", str(max(args.max_new_tokens, 1)),
                   "--batching", args.batching]
        if args.batcher_process:
            command.append("--batcher-process")
        if args.device:
            command += ["--device", args.device]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, (str(ROOT / "src"), os.environ.get("PYTHONPATH")))))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=self.log)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"the server exited:\n{self.log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.process.kill()
        sys.exit("the server did not start within 300 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def drive(server: Server, texts: list[str], clients: int, requests: int,
                max_new_tokens: int, name: str, start: int = 0, warm_up: bool = False) -> Scenario:
    """``requests`` requests (one text each, from ``texts[start]`` on, cycling) from
    ``clients`` closed-loop clients.

    The clients are aiohttp's, not httpx's: the load generator shares the machine's cores with
    the server, and httpx's pure-Python HTTP/1.1 client cost 2.1-2.9 ms of CPU per request where
    aiohttp's C parser costs 0.7-1.4 ms (CPU time, side by side against the same server): at 100
    requests/s that is 15-20% of a core handed back to the server being measured."""
    jobs = asyncio.Queue()
    for i in range(start, start + requests):
        jobs.put_nowait(texts[i % len(texts)])
    latencies, batches, outputs, errors, lengths = [], [], {}, 0, []

    async def post(session: aiohttp.ClientSession, text: str) -> tuple[int, dict | None]:
        async with session.post("/v1/generate", json={"inputs": [text],
                                                      "max_new_tokens": max_new_tokens}) as r:
            body = await r.read()  # the whole answer, whatever its status
            return r.status, json.loads(body) if r.status == 200 else None

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not jobs.empty():
            text = jobs.get_nowait()
            started = time.perf_counter()
            status, body = await post(session, text)
            if status != 200:
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000.0)
            batches.append(body["batch_inputs"])
            outputs[text] = body["outputs"][0]
            lengths.append((body["output_tokens"] or [0])[0])

    connector = aiohttp.TCPConnector(limit=clients)  # one kept-alive connection per client
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:
        if warm_up:
            await asyncio.gather(*(post(session, texts[i % len(texts)]) for i in range(clients)))
        started, cpu = time.perf_counter(), time.process_time()
        server_cpu = process_cpu_seconds(server.process.pid)
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
        cpu, server_cpu = (time.process_time() - cpu,
                           process_cpu_seconds(server.process.pid) - server_cpu)
    return Scenario(name, clients, seconds, latencies, batches, outputs, errors, lengths, cpu,
                    server_cpu)


async def burst(server: Server, texts: list[str], n: int, max_new_tokens: int,
                start: int) -> tuple[float, int]:
    """``n`` requests sent at once, one connection each (``texts`` from ``start`` on): the
    seconds until the last is answered, and how many were not answered 200."""
    errors = 0

    async def one(session: aiohttp.ClientSession, text: str) -> None:
        nonlocal errors
        async with session.post("/v1/generate", json={"inputs": [text],
                                                      "max_new_tokens": max_new_tokens}) as r:
            await r.read()
            errors += r.status != 200

    connector = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, texts[(start + i) % len(texts)]) for i in range(n)))
        return time.perf_counter() - started, errors


@dataclass
class Streamed:
    """Streaming clients of /v1/completions: per request the time to its first text chunk, and
    the gaps between its chunks (a chunk holds one token, or a few where the text of a token
    waits for the next: white space, byte-fallback pieces)."""

    name: str
    clients: int
    seconds: float
    first_ms: list[float]
    gaps_ms: list[float]
    errors: int
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    @staticmethod
    def pct(data: list[float], q: float) -> float:
        data = sorted(data)
        return data[min(len(data) - 1, round(q / 100 * (len(data) - 1)))] if data else float("nan")


async def closed_loop(server: Server, texts: list[str], clients: int, requests: int,
                      one) -> tuple[float, float, float]:
    """``requests`` calls of ``await one(session, text)`` (the texts cycled) from ``clients``
    closed-loop clients: (seconds, CPU seconds of this process, of the server)."""
    jobs = asyncio.Queue()
    for i in range(requests):
        jobs.put_nowait(texts[i % len(texts)])

    async def client(session: aiohttp.ClientSession) -> None:
        while not jobs.empty():
            await one(session, jobs.get_nowait())

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:
        started, cpu = time.perf_counter(), time.process_time()
        server_cpu = process_cpu_seconds(server.process.pid)
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return (time.perf_counter() - started, time.process_time() - cpu,
                process_cpu_seconds(server.process.pid) - server_cpu)


async def drive_stream(server: Server, texts: list[str], clients: int, requests: int,
                       max_new_tokens: int, name: str) -> Streamed:
    """``requests`` streamed completions (greedy) from ``clients`` closed-loop clients."""
    first, gaps, errors = [], [], 0

    async def one(session: aiohttp.ClientSession, text: str) -> None:
        nonlocal errors
        started, arrivals = time.perf_counter(), []
        async with session.post("/v1/completions", json={
                "prompt": text, "max_tokens": max_new_tokens, "temperature": 0,
                "stream": True}) as r:
            if r.status != 200:
                errors += 1
                await r.read()
                return
            async for line in r.content:
                if line.startswith(b"data: {") and b'"text":""' not in line:
                    arrivals.append(time.perf_counter())
        if arrivals:
            first.append((arrivals[0] - started) * 1000.0)
            gaps.extend((b - a) * 1000.0 for a, b in zip(arrivals, arrivals[1:]))

    seconds, cpu, server_cpu = await closed_loop(server, texts, clients, requests, one)
    return Streamed(name, clients, seconds, first, gaps, errors, cpu, server_cpu)


async def drive_route(server: Server, texts: list[str], clients: int, requests: int,
                      max_new_tokens: int, name: str, openai: bool) -> Scenario:
    """As `drive`, through /v1/completions (greedy, not streamed) when ``openai``."""
    if not openai:
        return await drive(server, texts, clients, requests, max_new_tokens, name)
    latencies, outputs, errors, lengths = [], {}, 0, []

    async def one(session: aiohttp.ClientSession, text: str) -> None:
        nonlocal errors
        started = time.perf_counter()
        async with session.post("/v1/completions", json={
                "prompt": text, "max_tokens": max_new_tokens, "temperature": 0}) as r:
            body = await r.read()
            if r.status != 200:
                errors += 1
                return
        latencies.append((time.perf_counter() - started) * 1000.0)
        answer = json.loads(body)
        outputs[text] = answer["choices"][0]["text"]
        lengths.append(answer["usage"]["completion_tokens"])

    seconds, cpu, server_cpu = await closed_loop(server, texts, clients, requests, one)
    # (no batch size in an OpenAI answer: nan in the table)
    return Scenario(name, clients, seconds, latencies, [float("nan")], outputs, errors, lengths,
                    cpu, server_cpu)


def openai_report(args: argparse.Namespace, checkpoint: str, texts: list[str]) -> None:
    """Streaming latency at 1 and N clients, on the batching server and on the same model served
    one request at a time; and /v1/completions against /v1/generate at N, on the batching one."""
    with Server(checkpoint, 1, 0.0, args) as single, \
            Server(checkpoint, args.clients, args.max_wait_ms, args) as server:
        for warm in (single, server):
            asyncio.run(drive(warm, texts, args.clients, args.clients, args.max_new_tokens,
                              "warm-up"))
        rows, streams = {}, {}
        for r in range(args.rounds):  # the scenarios take turns, as in main()
            n = args.requests // args.rounds
            routes = (("/v1/generate", False), ("/v1/completions", True))
            for name, openai in (routes if r % 2 == 0 else routes[::-1]):
                rows.setdefault(name, []).append(asyncio.run(drive_route(
                    server, texts, args.clients, n, args.max_new_tokens, name, openai)))
            for label, where in (("batching", server), ("one at a time", single)):
                for clients, total in ((1, args.single_requests), (args.clients, args.requests)):
                    part = asyncio.run(drive_stream(where, texts, clients, total // args.rounds,
                                                    args.max_new_tokens, label))
                    streams.setdefault((label, clients), []).append(part)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    report([merge(parts) for parts in rows.values()])
    generate, completions = (merge(parts) for parts in rows.values())
    print(f"/v1/completions / /v1/generate throughput at {args.clients} clients: "
          f"{completions.rps / generate.rps:.3f}x   (goal >= 0.95: at most 5% overhead)")
    print(f"\n{'streamed /v1/completions':<28}{'clients':>8}{'requests':>9}{'req/s':>8}"
          f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'errors':>7}"
          f"{'CPU srv':>8}{'CPU cli':>8}")
    for (label, clients), parts in streams.items():
        first = [x for p in parts for x in p.first_ms]
        gaps = [x for p in parts for x in p.gaps_ms]
        seconds = sum(p.seconds for p in parts)
        print(f"{label:<28}{clients:>8}{len(first):>9}{len(first) / seconds:>8.2f}"
              f"{Streamed.pct(first, 50):>10.1f}"
              f"{Streamed.pct(first, 99):>10.1f}{Streamed.pct(gaps, 50):>9.1f}"
              f"{Streamed.pct(gaps, 99):>9.1f}{sum(p.errors for p in parts):>7}"
              f"{sum(p.server_cpu_s for p in parts) / seconds:>8.0%}"
              f"{sum(p.client_cpu_s for p in parts) / seconds:>8.0%}")
    print("TTFT: request sent -> first text chunk; ITL: gap between two text chunks of one "
          "answer; times in ms; one at a time: the same model served with --max-batch-size 1")


def merge(parts: list[Scenario]) -> Scenario:
    """One scenario from its interleaved chunks."""
    outputs = {}
    for part in parts:
        outputs.update(part.outputs)
    return Scenario(parts[0].name, parts[0].clients, sum(p.seconds for p in parts),
                    [x for p in parts for x in p.latencies_ms],
                    [x for p in parts for x in p.batch_sizes], outputs, sum(p.errors for p in parts),
                    [x for p in parts for x in p.output_tokens],
                    sum(p.client_cpu_s for p in parts), sum(p.server_cpu_s for p in parts))


def read_texts(path: Path, limit: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["source"] for line in lines[:limit] if line.strip()]


def train_tiny(data: Path, out: Path) -> str:
    """No checkpoint given: a small model trained for a few hundred steps on Multi30k."""
    sys.path.insert(0, str(ROOT / "src"))
    from tformer.training import load_config, train

    overrides = [f"data.train={data.with_name('train.jsonl')}", f"data.validation={data}",
                 "data.max_train_examples=5000", "data.vocab_size=2000", "model.size=tiny",
                 "train.max_steps=300", "train.eval_every=300", "train.max_tokens=2000",
                 "train.warmup_steps=50", "train.lr=3e-3", "train.eval_max_examples=16",
                 "train.max_new_tokens=16", f"train.output_dir={out}"]
    result = train(load_config(None, overrides))
    return str(result.best_checkpoint)


def random_checkpoint(source: str, size: str, out: Path) -> str:
    """A model of ``size`` (``tformer.model.SIZES``, e.g. base: d_model 512, 6+6 layers) with
    ``source``'s tokenizer and freshly initialised weights (seed 0), for timing a model of that
    size. Its outputs mean nothing, and with no trained end-of-sequence they mostly run to
    ``max_new_tokens``."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import tformer
    from tformer.hf import TformerConfig, TformerForConditionalGeneration
    from tformer.model import config_for

    trained = tformer.load(source, device="cpu")
    old = trained.model.config
    core = config_for(size, old.vocab_size, pad_token_id=old.pad_token_id)
    torch.manual_seed(0)
    model = TformerForConditionalGeneration(TformerConfig.from_transformer_config(
        core, bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
        decoder_start_token_id=old.decoder_start_token_id))
    model.save_pretrained(out)
    trained.tokenizer.save_pretrained(out)
    print(f"random-init {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, tokenizer of {source}")
    return str(out)


def report(rows: list[Scenario]) -> None:
    print(f"{'scenario':<34}{'clients':>8}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'mean batch':>11}{'out tok':>8}{'errors':>7}{'CPU srv':>8}{'CPU cli':>8}")
    print("-" * 120)
    for s in rows:
        print(f"{s.name:<34}{s.clients:>8}{len(s.latencies_ms):>9}{s.rps:>9.2f}{s.pct(50):>9.1f}"
              f"{s.pct(99):>9.1f}{statistics.fmean(s.batch_sizes):>11.2f}"
              f"{statistics.fmean(s.output_tokens):>8.1f}{s.errors:>7}"
              + (f"{s.server_cpu_s / s.seconds:>8.0%}" if s.server_cpu_s else f"{'n/a':>8}")
              + f"{s.client_cpu_s / s.seconds:>8.0%}")
    print("CPU srv / CPU cli: CPU time of the server / of the load generator over the "
          "scenario's wall time (100% = one core busy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="model directory (default: train a tiny one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="per N-client scenario")
    parser.add_argument("--single-requests", type=int, default=40, help="per 1-client scenario")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS,
                        help="JSONL with a 'source' field (default: Multi30k validation)")
    parser.add_argument("--batching", default="auto", choices=("auto", "continuous", "dynamic"),
                        help="batching of both servers (the one-at-a-time one has batch size "
                        "1, so it runs the same code path); auto = continuous for tformer's "
                        "own model")
    parser.add_argument("--batcher-process", action="store_true",
                        help="both servers run their batcher in a process of its own "
                        "(tformer serve --batcher-process)")
    parser.add_argument("--random-init", metavar="SIZE", default=None,
                        help="serve a freshly initialised model of this size (tiny, small, "
                        "base) with the checkpoint's tokenizer instead of its weights")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--rounds", type=int, default=4,
                        help="chunks each scenario is split into, taking turns (default 4)")
    parser.add_argument("--quick", action="store_true", help="64 / 8 requests: a smoke run")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="also: N requests sent at once to each server, --rounds times "
                        "(the time until all are answered)")
    parser.add_argument("--openai", action="store_true", help="instead: streaming clients of "
                        "/v1/completions (time to first token, inter-token latency; 1 and "
                        "--clients clients, batching and one at a time) and /v1/completions "
                        "against /v1/generate on the batching server")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.single_requests = 64, 8
    texts = read_texts(args.inputs, 256)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or train_tiny(args.inputs, Path(tmp) / "run")
        if args.random_init:
            checkpoint = random_checkpoint(checkpoint, args.random_init, Path(tmp) / "random")
        print(f"checkpoint {checkpoint}; {len(texts)} distinct inputs from {args.inputs.name}; "
              f"greedy, max_new_tokens {args.max_new_tokens}; max_wait_ms {args.max_wait_ms}; batcher "
              f"{'in a process of its own' if args.batcher_process else 'in the server process'}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
        if args.openai:
            openai_report(args, checkpoint, texts)
            return
        # Both servers run at once (the idle one costs nothing) and the scenarios take turns in
        # --rounds chunks, in alternating order: a change of the machine's background load
        # then falls on every scenario alike instead of on whichever ran at that moment.
        with Server(checkpoint, 1, 0.0, args) as single, \
                Server(checkpoint, args.clients, args.max_wait_ms, args) as batched:
            plan = [("one at a time, 1 client", single, 1, args.single_requests),
                    ("one at a time", single, args.clients, args.requests),
                    ("batching", batched, args.clients, args.requests),
                    ("batching, 1 client", batched, 1, args.single_requests)]
            parts: dict[str, list[Scenario]] = {name: [] for name, *_ in plan}
            for r in range(args.rounds):
                for name, server, clients, total in (plan if r % 2 == 0 else plan[::-1]):
                    n = total // args.rounds
                    parts[name].append(asyncio.run(drive(
                        server, texts, clients, n, args.max_new_tokens, name, start=r * n,
                        warm_up=r == 0)))
            bursts: dict[str, list[tuple[float, int]]] = {"one at a time": [], "batching": []}
            for r in range(args.rounds if args.burst else 0):
                pair = [("one at a time", single), ("batching", batched)]
                for name, server in (pair if r % 2 == 0 else pair[::-1]):
                    bursts[name].append(asyncio.run(burst(server, texts, args.burst,
                                                          args.max_new_tokens, r * args.burst)))
        rows = [merge(parts[name]) for name, *_ in plan]
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    report(rows)
    alone, serial, batched, batched_alone = rows
    mismatched = sum(batched.outputs[t] != serial.outputs[t]
                     for t in batched.outputs if t in serial.outputs)
    print(f"\nbatching {args.batching}; throughput, batching / one at a time ({args.clients} "
          "clients): "
          f"{batched.rps / serial.rps:.2f}x   (goal >= 4)")
    print(f"p99 latency, batching at {args.clients} clients / single request: "
          f"{batched.pct(99) / alone.pct(99):.2f}x   (goal <= 2)")
    print(f"p50 latency, same ratio: {batched.pct(50) / alone.pct(50):.2f}x; batching window "
          f"at 1 client: p50 {batched_alone.pct(50) / alone.pct(50):.2f}x of one at a time")
    print(f"outputs: {len(batched.outputs)} texts compared, {mismatched} differ between "
          f"batched and one-at-a-time serving; errors: {sum(r.errors for r in rows)}")
    if args.burst:
        ms = {name: statistics.median(s for s, _ in runs) * 1000 for name, runs in bursts.items()}
        print(f"burst of {args.burst} requests sent at once (median of {args.rounds}): all "
              f"answered in {ms['batching']:.0f} ms batching, {ms['one at a time']:.0f} ms one "
              f"at a time: {ms['one at a time'] / ms['batching']:.2f}x; errors: "
              f"{sum(e for runs in bursts.values() for _, e in runs)}")


if __name__ == "__main__":
    main()
