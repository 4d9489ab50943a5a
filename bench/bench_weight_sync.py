"""Weight sync from a trainer process: GB/s of update_weights_from_ipc and of
update_weights_from_distributed, against the device-to-device copy of the same tensors.

The engine holds a model of Qwen2.5-7B widths (--layers of its 28; the rate per byte does
not depend on the count); a separate trainer process holds random bf16 tensors of the same
names and shapes and sends them each repetition:

- ipc: the trainer's CUDA tensors shared by CUDA IPC on the same GPU, with fresh handles
  for each update (made untimed); the engine checks every value (NaN/inf) and copies
  each into its parameters (also without the check). The trainer's memory outlives every
  use: after the last update the engine has dropped everything it opened and
  synchronised, says "done", and only then does the trainer free its tensors, answer
  "bye" and exit;
- broadcast: send_weights -> update_weights_from_distributed in buckets; NCCL when there
  are two GPUs (trainer on GPU 1), else gloo through host memory (NCCL refuses two ranks
  on one GPU), which is what one GPU allows;
- peer: copying every tensor once on the device (clone), the floor any sync pays to land
  the bytes; and the 2-byte-per-byte D2D copy rate.

Every path's median time over --reps is printed with its GB/s (bytes of the update per
second) and its ratio to the peer.

    python bench/bench_weight_sync.py --layers 28 --reps 5
    python bench/bench_weight_sync.py --model tiny --device cpu --reps 2   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import MODELS  # noqa: E402

from tokenspeed import Engine  # noqa: E402
from tokenspeed.parallel.launch import free_port  # noqa: E402
from tokenspeed.weight_sync import (init_weight_sync_group, ipc_handles,  # noqa: E402
                                    metadata_of, send_weights)

MODELS = {**MODELS, "tiny": dict(hf_config=dict(
    model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
    max_position_embeddings=8192, tie_word_embeddings=False))}


def build_engine(model: str, layers: int | None, device: str) -> Engine:
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = dict(MODELS[model]["hf_config"])
    if layers is not None:
        hf["num_hidden_layers"] = layers
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf), dtype=torch.bfloat16)
    engine = Engine.from_hf_model(m, device=device, dtype="bfloat16", kv_cache_tokens=4096)
    del m
    return engine


def random_weights(shapes: list[tuple[str, list[int]]], device: str
                   ) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [(name, (0.02 * torch.randn(shape, generator=gen, device=device))
             .to(torch.bfloat16)) for name, shape in shapes]


def _ipc_trainer(shapes, device: str, conn) -> None:
    """Shares its tensors afresh for each update the engine asks for ("share"). On "done"
    (the engine has dropped every opened tensor and synchronised) it frees them and
    answers "bye": its memory and its process outlive every use the engine makes of them."""
    weights = random_weights(shapes, device)
    while (msg := conn.recv()) == "share":
        conn.send(ipc_handles(weights))
    assert msg == "done", msg
    del weights
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
    conn.send("bye")


def _broadcast_trainer(kind: str, shapes, device: str, port: int, bucket_bytes: int,
                       conn) -> None:
    """Joins the group as rank 0 and broadcasts the update per "send"; "done" ends it."""
    if kind == "broadcast-nccl":
        torch.cuda.set_device(1)
        device = "cuda:1"
    weights = random_weights(shapes, device)
    backend = "nccl" if kind == "broadcast-nccl" else "gloo"
    if backend == "gloo":
        weights = [(n, t.cpu()) for n, t in weights]
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, backend=backend)
    conn.send(metadata_of(weights))
    while (msg := conn.recv()) == "send":
        send_weights(weights, group, bucket_bytes=bucket_bytes)
    assert msg == "done", msg
    conn.send("bye")


def start_trainer(target, *args):
    """A spawned trainer process and this end of its pipe."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()  # so a trainer that dies reads as EOF here instead of a hang
    return proc, conn


def receive(conn, timeout_s: float = 600.0):
    if not conn.poll(timeout_s):
        raise RuntimeError(f"the trainer process did not answer within {timeout_s:.0f} s")
    return conn.recv()


def finish(proc, conn) -> None:
    """The final handshake: "done", then the trainer's "bye" and a clean exit."""
    reply = None
    try:
        conn.send("done")
        reply = receive(conn)
    except (EOFError, OSError):
        pass  # the trainer is gone: its exit code says why
    proc.join(120)
    if reply != "bye" or proc.exitcode != 0:
        raise RuntimeError(f"the trainer process ended badly (answer {reply!r}, exit code "
                           f"{proc.exitcode})")


def timed(fn, reps: int, device: str, prepare=None) -> float:
    """Median seconds of fn() (of fn(prepare()), prepare untimed) over reps after one
    warm-up, the device synchronised."""
    times = []
    for i in range(reps + 1):
        args = () if prepare is None else (prepare(),)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        del args
    return statistics.median(times)


def ipc_rows(engine: Engine, shapes, device: str, reps: int) -> list[tuple[str, float]]:
    """update_weights_from_ipc from a trainer process, with and without the value check.
    Every update gets fresh handles, made untimed (a trainer makes them per update)."""
    proc, conn = start_trainer(_ipc_trainer, shapes, device)

    def handles():
        conn.send("share")
        return receive(conn)
    rows = []
    try:
        for name, check in (("ipc, values checked", True), ("ipc, unchecked", False)):
            rows.append((name, timed(lambda h, check=check: engine.update_weights_from_ipc(
                h, check_finite=check), reps, device, prepare=handles)))
    finally:
        # the engine keeps no opened tensor past its call and nothing here holds one
        # (a reference cycle would, until collected): only then may the trainer free
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()
        finish(proc, conn)
    return rows


def broadcast_row(engine: Engine, shapes, device: str, reps: int, bucket_mb: int
                  ) -> tuple[str, float]:
    kind = ("broadcast-nccl" if device.startswith("cuda") and torch.cuda.device_count() > 1
            else "broadcast-gloo")
    port = free_port()
    proc, conn = start_trainer(_broadcast_trainer, kind, shapes, device, port, bucket_mb << 20)
    try:
        engine.init_weight_sync_group("127.0.0.1", port, 1, 2, backend=kind.split("-")[1],
                                      timeout_s=600)
        meta = receive(conn)

        def broadcast() -> None:
            conn.send("send")
            engine.update_weights_from_distributed(*meta, bucket_bytes=bucket_mb << 20)
        return f"{kind}, {bucket_mb} MiB buckets", timed(broadcast, reps, device)
    finally:
        finish(proc, conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-7b", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the model (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=1024)
    args = parser.parse_args()
    device = args.device
    engine = build_engine(args.model, args.layers, device)
    # HF names and shapes, as a trainer sends them
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = dict(MODELS[args.model]["hf_config"])
    if args.layers is not None:
        hf["num_hidden_layers"] = args.layers
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    shapes = [(n, list(t.shape)) for n, t in meta_model.state_dict().items()]
    nbytes = sum(torch.Size(s).numel() * 2 for _, s in shapes)
    print(f"{args.model}, {hf['num_hidden_layers']} layers, {nbytes / 1e9:.2f} GB of bf16 "
          f"weights, {len(shapes)} tensors, device {device}, median of {args.reps}")

    rows: list[tuple[str, float]] = []
    local = random_weights(shapes, device)
    rows.append(("peer: clone every tensor on the device",
                 timed(lambda: [t.clone() for _, t in local], args.reps, device)))
    if device.startswith("cuda"):
        from shapes import copy_bandwidth
        print(f"D2D copy rate {copy_bandwidth() / 1e12:.2f} TB/s (read + write)")
    del local

    rows += ipc_rows(engine, shapes, device, args.reps)
    rows.append(broadcast_row(engine, shapes, device, args.reps, args.bucket_mb))
    engine.close()

    peer = rows[0][1]
    for name, seconds in rows:
        print(f"{name:45s} {seconds * 1e3:10.1f} ms {nbytes / seconds / 1e9:8.1f} GB/s "
              f"{seconds / peer:8.2f}x peer")


if __name__ == "__main__":
    main()
