"""`tokenspeed serve` under N concurrent HTTP clients vs the direct Python API.

Workload (seeded): R GRPO-shaped requests, each one prompt with G completions (a trainer
worker's group). The direct peers run in this process on an engine with the server's
settings: the whole workload in one compute_log_probs call (the best a single trainer
can do) and one call per request in turn (what N trainers sharing one engine without
merging get). Then the engine is closed and a real `tokenspeed serve` process is started
on a free localhost port; for each N, N client threads (one ScoringClient each) pull the
requests from a shared queue. Reported: completion tokens/s, the ratio to the direct
whole-workload call, and p50/p99 request latency. The prefix cache is flushed before
every timed run, so no run reuses another's K/V.

    python bench/bench_server.py                       # CPU: the built-in model, small
    python bench/bench_server.py --model qwen2.5-1.5b --device cuda --requests 64 \\
        --prompt-len 128 2048 --completion-median 512 [--deterministic]

--deterministic runs the direct engine and the server in batch-invariant mode (every
server response then equals a direct call on its request alone, bit for bit).

--free-engine measures the server's own cost: its engine runs no model (bench/free_engine.py:
every batch's scores are zeros), the direct peers are skipped, and each run reports its
wall time and the CPU seconds of the server process and of the clients (this process).

    python bench/bench_server.py --model tiny --free-engine --requests 64 \
        --prompt-len 128 2048 --completion-median 512      # the H200 workload's sizes
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def make_workload(requests: int, group: int, vocab: int, prompt_len: tuple[int, int],
                  completion_median: int, max_len: int, seed: int = 0) -> list[list[dict]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(requests):
        plen = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        prompt = torch.randint(0, vocab, (plen,), generator=g).tolist()
        seqs = []
        for _ in range(group):
            clen = math.exp(math.log(completion_median) + 0.6 * float(torch.randn(1, generator=g)))
            clen = max(1, min(max_len - plen, int(clen)))
            seqs.append({"prompt_token_ids": prompt,
                         "completion_token_ids": torch.randint(0, vocab, (clen,),
                                                               generator=g).tolist()})
        out.append(seqs)
    return out


def completion_tokens(requests: list[list[dict]]) -> int:
    return sum(len(s["completion_token_ids"]) for r in requests for s in r)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def direct(model_dir: Path, args: argparse.Namespace, work: list[list[dict]]) -> dict:
    from tokenspeed import Engine

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    with Engine(model_dir, device=args.device, max_batch_tokens=args.max_batch_tokens,
                deterministic=args.deterministic) as engine:
        engine.compute_log_probs(work[0])  # warm-up
        times = {}
        for name, calls in (("whole", [sum(work, [])]), ("per_request", work)):
            best = float("inf")
            for _ in range(args.reps):
                engine.flush_cache()
                sync()
                t0 = time.perf_counter()
                for c in calls:
                    engine.compute_log_probs(c)
                sync()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    from tokenspeed.client import ScoringClient
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    launcher = [str(ROOT / "bench" / "free_engine.py")] if args.free_engine else \
        ["-m", "tokenspeed"]
    proc = subprocess.Popen([sys.executable, *launcher, "serve", str(model_dir),
                             "--port", str(port), "--device", args.device,
                             "--max-batch-tokens", str(args.max_batch_tokens),
                             *(["--deterministic"] if args.deterministic else [])], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    with ScoringClient(url) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if client.healthy():
                    return proc, url
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)


def through_server(url: str, clients: int, work: list[list[dict]],
                   counters: Callable[[], tuple[float, ...]] = tuple
                   ) -> tuple[float, list[float], tuple[float, ...]]:
    """Wall time, request latencies, and the growth of ``counters`` over the timed span
    (the clients are built before it)."""
    from tokenspeed.client import ScoringClient
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for r in work:
        todo.put(r)
    latencies: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        with ScoringClient(url) as c:
            barrier.wait()
            try:
                while True:
                    try:
                        r = todo.get_nowait()
                    except queue.Empty:
                        return
                    t0 = time.perf_counter()
                    c.score(r)
                    latencies.append(time.perf_counter() - t0)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0, before = time.perf_counter(), counters()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    grown = tuple(b - a for a, b in zip(before, counters()))
    if errors:
        raise errors[0]
    return elapsed, latencies, grown


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin",
                   help="builtin, or a config of bench_scoring.py (shapes.py's and 'tiny'; "
                        "random bf16 weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256])
    p.add_argument("--completion-median", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2, help="direct runs per peer (best kept)")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant mode in the direct engine and the server alike")
    p.add_argument("--free-engine", action="store_true",
                   help="the server's engine runs no model: measure the server's own cost")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per client count")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "builtin":
            from tokenspeed.builtin import CONFIG, builtin_model_dir
            model_dir, vocab, max_len = builtin_model_dir(), CONFIG["vocab_size"], \
                CONFIG["max_position_embeddings"]
        else:
            import bench_scoring
            bench_scoring.DEVICE = args.device
            model_dir = bench_scoring.build_checkpoint(args.model, Path(tmp))
            cfg = bench_scoring.MODELS[args.model]["hf_config"]
            vocab, max_len = cfg["vocab_size"], cfg.get("max_position_embeddings", 32768)
        work = make_workload(args.requests, args.group, vocab, tuple(args.prompt_len),
                             args.completion_median, max_len)
        tokens = completion_tokens(work)
        print(f"model {args.model} on {args.device}; {args.requests} requests x {args.group} "
              f"completions, {tokens} completion tokens, "
              f"{sum(len(s['prompt_token_ids']) + len(s['completion_token_ids']) for r in work for s in r)} "
              f"tokens in all; max_batch_tokens {args.max_batch_tokens}"
              f"{', deterministic' if args.deterministic else ''}", flush=True)
        if args.free_engine:
            print(f"{'peer':<26}{'wall s':>8}{'server cpu s':>14}{'clients cpu s':>15}"
                  f"{'p50 ms':>10}{'p99 ms':>10}")
        else:
            times = direct(model_dir, args, work)
            base = tokens / times["whole"]
            print(f"{'peer':<26}{'tok/s':>12}{'ratio':>8}{'p50 ms':>10}{'p99 ms':>10}")
            print(f"{'direct, one call':<26}{base:>12,.0f}{1.0:>8.2f}")
            rate = tokens / times["per_request"]
            print(f"{'direct, call per request':<26}{rate:>12,.0f}{rate / base:>8.2f}",
                  flush=True)

        proc, url = start_server(model_dir, args)
        try:
            from tokenspeed.client import ScoringClient
            with ScoringClient(url) as admin:
                through_server(url, 8, work[:8])  # warm-up
                for n in args.clients:
                    for _ in range(args.repeat):
                        admin.flush_cache()
                        elapsed, lat, (server_cpu, own_cpu) = through_server(
                            url, n, work, lambda: (cpu_seconds(proc.pid), own_cpu_seconds()))
                        p50, p99 = percentile(lat, 0.5) * 1e3, percentile(lat, 0.99) * 1e3
                        name = f"server, {n} clients"
                        if args.free_engine:
                            print(f"{name:<26}{elapsed:>8.2f}{server_cpu:>14.2f}"
                                  f"{own_cpu:>15.2f}{p50:>10.1f}{p99:>10.1f}", flush=True)
                        else:
                            rate = tokens / elapsed
                            print(f"{name:<26}{rate:>12,.0f}{rate / base:>8.2f}{p50:>10.1f}"
                                  f"{p99:>10.1f}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)


if __name__ == "__main__":
    main()
