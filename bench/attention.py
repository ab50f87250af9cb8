"""tformer's MultiHeadAttention against torch.nn.MultiheadAttention: forward+backward time and
peak memory, self-attention, batch_first, identical weights.

    .venv/bin/python bench/attention.py            # lengths 64..2048 (~4 min on a busy 2-core CPU)
    .venv/bin/python bench/attention.py --quick    # lengths 64..512, smaller batches (< 1 min)
    .venv/bin/python bench/attention.py --device cuda --dtype bf16 --tokens 65536

Three cases: no mask, a key-padding mask (sequence lengths drawn between T/2 and T; the peer gets
it as ``key_padding_mask``, True = ignore), and causal (the peer gets the causal mask with the
``is_causal=True`` hint, which lets it use the same fused causal kernel as tformer). These use the
fast path. ``--cases weights`` adds the padding case with the attention weights returned
(``need_weights=True`` on both sides), which takes tformer's math path: the (T, T) cost, shown.

``--dtype bf16`` casts weights and inputs (it is not autocast); it is meant for a GPU: on a CPU
without bf16 matrix instructions (AVX2) it is several times slower than fp32.

Batches hold a constant number of tokens (``--tokens``, B = tokens // T), as tformer's
token-budget batches do, so every row costs about the same in projections and the growth with T
is the attention's own. Each repetition runs both modules, alternating which goes first; the
table shows medians. ratio = torch time / tformer time, the median of the per-repetition ratios:
> 1 means tformer is faster.

Peak memory is the most bytes held at once by tensors allocated during one forward+backward
(weights and the input excluded), reported per batch. On CUDA it is
``torch.cuda.max_memory_allocated``. On CPU there is no such counter, so the step runs once under
``torch.profiler.profile(profile_memory=True)``: every allocation and free of PyTorch's CPU
allocator is then recorded with the allocator's running total of bytes allocated, and the peak is
the maximum of that total minus its value at the start. That counts exactly the tensors, including
the kernels' scratch buffers allocated through PyTorch, and nothing else. Process RSS
(``resource.getrusage``) was not used: it only ever grows, includes whatever the Python
interpreter and malloc keep cached, and would need one process per configuration.

"growth/2x" is how much the peak memory *per sequence* grows when T doubles: about 2 when memory is
linear in the length, about 4 when a (T, T) matrix is materialised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run without installing

from tformer.model.attention import MultiHeadAttention  # noqa: E402
from tformer.model.masks import padding_mask  # noqa: E402

CASES = ("none", "padding", "causal")  # the default run
OPTIONAL_CASES = ("weights",)  # padding mask, attention weights returned: the math path
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_pair(
    d_model: int, n_heads: int, device: str, dtype: torch.dtype
) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    """tformer's module and the peer with the same weights (non-zero biases: a mis-copy shows)."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_(std=0.02)
        ref.out_proj.bias.normal_(std=0.02)
    ours = MultiHeadAttention(d_model, n_heads)
    with torch.no_grad():
        ours.in_proj.weight.copy_(ref.in_proj_weight)
        ours.in_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    # Training mode, as in a training step: nn.MultiheadAttention's inference-only fast path
    # (torch._native_multi_head_attention) does not apply to forward+backward anyway.
    return ours.to(device, dtype).train(), ref.to(device, dtype).train()


def make_steps(
    case: str, ours: MultiHeadAttention, ref: nn.MultiheadAttention, b: int, t: int,
    device: str, dtype: torch.dtype,
) -> tuple[Callable[[], Tensor], Callable[[], Tensor], Tensor]:
    """Two closures computing the same (B, T, D) output, and the input they share."""
    gen = torch.Generator().manual_seed(t)
    d = ours.out_proj.in_features
    x = torch.randn(b, t, d, generator=gen).to(device, dtype).requires_grad_()
    if case == "none":
        return (lambda: ours(x).output), (lambda: ref(x, x, x, need_weights=False)[0]), x
    if case in ("padding", "weights"):
        # Every row has some padding, even when B = 1: the kernel must honour the mask.
        lengths = torch.randint(t // 2, t, (b,), generator=gen)
        keep = (torch.arange(t)[None, :] < lengths[:, None]).to(device)  # (B, T) True = token
        mask = padding_mask(keep)  # (B, 1, 1, T), True = may attend
        ignore = ~keep  # the peer's convention: True = ignore
        if case == "weights":  # both materialise the (B, H, T, T) weights
            return (
                lambda: ours(x, mask=mask, need_weights=True).output,
                lambda: ref(
                    x, x, x, key_padding_mask=ignore, need_weights=True,
                    average_attn_weights=False,
                )[0],
                x,
            )
        return (
            lambda: ours(x, mask=mask).output,
            lambda: ref(x, x, x, key_padding_mask=ignore, need_weights=False)[0],
            x,
        )
    if case == "causal":
        future = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)  # True = ignore
        return (
            lambda: ours(x, is_causal=True).output,
            lambda: ref(x, x, x, attn_mask=future, is_causal=True, need_weights=False)[0],
            x,
        )
    raise ValueError(f"unknown case {case!r}; choose from {CASES + OPTIONAL_CASES}")


def train_step(forward: Callable[[], Tensor]) -> None:
    forward().float().sum().backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(forward: Callable[[], Tensor], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    train_step(forward)
    sync(device)
    return time.perf_counter() - start


def peak_bytes(forward: Callable[[], Tensor], device: str) -> int:
    """Peak bytes allocated during one forward+backward above what was allocated before it."""
    if device.startswith("cuda"):
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(forward)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(lambda: train_step(forward))


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # (time, bytes allocated (+) or freed (-), allocator's running total after it)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        stack.extend(event.children)
    if not events:
        return 0
    events.sort()
    baseline = events[0][2] - events[0][1]  # the running total just before the first event
    return max(total for _, _, total in events) - baseline


def bench_case(
    case: str, ours: MultiHeadAttention, ref: nn.MultiheadAttention, b: int, t: int, reps: int,
    device: str, dtype: torch.dtype,
) -> dict[str, float]:
    ours_fwd, ref_fwd, x = make_steps(case, ours, ref, b, t, device, dtype)
    with torch.no_grad():  # same weights, same input: same output (checked, not assumed)
        diff = (ours_fwd() - ref_fwd()).abs().max().item()
    for fwd in (ours_fwd, ref_fwd):  # warm-up: first-call allocations, kernel selection
        train_step(fwd)
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for rep in range(reps):
        order = [("ours", ours_fwd), ("ref", ref_fwd)]
        for name, fwd in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(time_step(fwd, device))
    result = {
        "diff": diff,
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "ref_ms": 1e3 * statistics.median(times["ref"]),
        # Paired: each repetition times both back to back, so a burst of load from another
        # process slows both; the median of the pairs' ratios is steadier than a ratio of medians.
        "ratio": statistics.median(
            [r / o for o, r in zip(times["ours"], times["ref"], strict=True)]
        ),
        "ours_mib": peak_bytes(ours_fwd, device) / 2**20,
        "ref_mib": peak_bytes(ref_fwd, device) / 2**20,
    }
    x.grad = None
    for module in (ours, ref):
        module.zero_grad(set_to_none=True)
    return result


def growth(prev: dict | None, row: dict, key: str) -> str:
    """Peak memory per sequence at T over the same at T/2."""
    if prev is None or prev[key] <= 0:
        return "-"
    return f"{(row[key] / row['b']) / (prev[key] / prev['b']):.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="lengths 64..512, 1024 tokens, 3 reps")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", help="default 64 128 ... 2048")
    p.add_argument("--tokens", type=int, help="tokens per batch, B = tokens // T (default 2048)")
    p.add_argument("--reps", type=int, help="timed repetitions per case (default 7, quick 3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument(
        "--cases", nargs="+", default=list(CASES), choices=CASES + OPTIONAL_CASES,
        help="default: none padding causal; 'weights' adds need_weights=True (the math path)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    full = [64, 128, 256, 512, 1024, 2048]
    lengths = args.lengths or (full[:4] if args.quick else full)
    reps = args.reps or (3 if args.quick else 7)
    tokens = args.tokens or (1024 if args.quick else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    ours, ref = build_pair(args.d_model, args.heads, args.device, dtype)

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"torch {torch.__version__}; {where}; {args.dtype}; d_model {args.d_model}, "
          f"{args.heads} heads; {tokens} tokens per batch; median of {reps}; forward+backward")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    header = (
        f"{'case':<8} {'T':>5} {'B':>4} {'tformer ms':>11} {'torch ms':>9} {'ratio':>6} "
        f"{'tformer MiB':>12} {'torch MiB':>10} {'growth/2x':>10} {'torch g/2x':>10}"
    )
    worst_diff = 0.0
    started = time.perf_counter()
    for case in args.cases:
        print()
        print(header)
        print("-" * len(header))
        prev = None
        for t in lengths:
            b = max(1, tokens // t)
            row = bench_case(case, ours, ref, b, t, reps, args.device, dtype) | {"b": b}
            worst_diff = max(worst_diff, row["diff"])
            print(
                f"{case:<8} {t:>5} {b:>4} {row['ours_ms']:>11.1f} {row['ref_ms']:>9.1f} "
                f"{row['ratio']:>6.2f} {row['ours_mib']:>12.1f} "
                f"{row['ref_mib']:>10.1f} {growth(prev, row, 'ours_mib'):>10} "
                f"{growth(prev, row, 'ref_mib'):>10}",
                flush=True,
            )
            prev = row
    print()
    print(f"largest |tformer - torch| output difference: {worst_diff:.2e}; "
          f"took {time.perf_counter() - started:.0f} s")
    if hasattr(os, "getloadavg"):
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
