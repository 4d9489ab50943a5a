"""Weights from a training process: broadcast over a weight-sync group (gloo here, NCCL on
GPUs) and CUDA IPC. After an update the engine scores exactly as a fresh engine built from
the new weights; a rejected update raises on both ends and leaves the old weights."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import traceback
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_factory import make_checkpoint, max_abs_diff, random_sequences
from safetensors.torch import load_file

from tokenspeed import Engine
from tokenspeed.parallel.launch import free_port
from tokenspeed.weight_sync import (ALIGN, init_weight_sync_group, ipc_handles, metadata_of,
                                    plan_buckets, receive_weights, send_weights,
                                    update_metadata)

pytest.importorskip("transformers")
VOCAB = 101
ARCH = "Qwen3ForCausalLM"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    return (make_checkpoint(tmp_path_factory.mktemp("old"), ARCH, vocab=VOCAB, seed=1),
            make_checkpoint(tmp_path_factory.mktemp("new"), ARCH, vocab=VOCAB, seed=2))


@pytest.fixture(scope="module")
def seqs() -> list[dict]:
    return random_sequences(torch.Generator().manual_seed(4), VOCAB, 6)


def fresh_scores(path: Path, seqs: list[dict]) -> list[list[float]]:
    with Engine(path, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        return engine.compute_log_probs(seqs)["log_probs"]


def _trainer(port: int, world: int, conn) -> None:
    """The training process: joins the group as rank 0, then sends what it is told."""
    try:
        group = init_weight_sync_group("127.0.0.1", port, 0, world, backend="gloo")
        conn.send(("ok", None))
    except Exception as e:  # noqa: BLE001 - reported to the test
        conn.send(("err", repr(e)))
        return
    while (msg := conn.recv()) is not None:
        weights, bucket_bytes = msg
        try:
            send_weights(weights, group, bucket_bytes=bucket_bytes)
            conn.send(("ok", None))
        except Exception as e:  # noqa: BLE001 - reported to the test
            conn.send(("err", "".join(traceback.format_exception_only(e))))


class Trainer:
    """A trainer process joined to ``engine``'s weight-sync group on gloo."""

    def __init__(self, engine: Engine, tp_size: int = 1):
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_trainer, args=(port, 1 + tp_size, child), daemon=True)
        self.proc.start()
        engine.init_weight_sync_group("127.0.0.1", port, 1, 1 + tp_size, backend="gloo",
                                      timeout_s=120)
        assert self.reply() == ("ok", None)

    def reply(self) -> tuple[str, str | None]:
        assert self.conn.poll(120), "the trainer process did not answer"
        return self.conn.recv()

    def send(self, engine: Engine, weights: list[tuple[str, torch.Tensor]],
             bucket_bytes: int = 1 << 12, **receive) -> tuple[str, str | None]:
        """Both ends of one update; returns the trainer's reply, raises the engine's error."""
        self.conn.send((weights, bucket_bytes))
        try:
            engine.update_weights_from_distributed(*metadata_of(weights),
                                                   bucket_bytes=bucket_bytes, **receive)
        finally:
            reply = self.reply()
        return reply

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def test_update_from_distributed_equals_fresh_engine_and_rejects_atomically(ckpts, seqs):
    old, new = ckpts
    ref_old, ref_new = fresh_scores(old, seqs), fresh_scores(new, seqs)
    new_weights = list(load_file(str(new / "model.safetensors")).items())
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        trainer = Trainer(engine)
        engine.compute_log_probs(seqs)  # fills the prefix cache with old K/V
        cached = engine.stats()

        # a wrong shape in the middle of the list: rejected before anything moves
        bad = list(new_weights)
        mid = len(bad) // 2
        bad[mid] = (bad[mid][0], torch.zeros(3, 5))
        with pytest.raises(ValueError,
                           match=rf"weight {bad[mid][0]!r}: .*expected shape .*got \(3, 5\)"):
            trainer.send(engine, bad)
        assert engine.stats() == cached  # nothing moved, the prefix cache included
        out = engine.compute_log_probs(seqs)
        assert out["log_probs"] == ref_old and out["weight_version"] == 0
        assert engine.stats()["prefix_hit_tokens"] > cached["prefix_hit_tokens"]

        # NaN in the last bucket: everything was received, nothing is written
        bad = list(new_weights)
        bad[-1] = (bad[-1][0], bad[-1][1].clone())
        bad[-1][1].view(-1)[-1] = float("nan")
        with pytest.raises(ValueError, match=rf"weight {bad[-1][0]!r} holds NaN"):
            trainer.send(engine, bad)
        assert engine.compute_log_probs(seqs)["log_probs"] == ref_old

        # the group is still in step: a good update now lands whole
        assert trainer.send(engine, new_weights) == ("ok", None)
        out = engine.compute_log_probs(seqs)
        assert max_abs_diff(out["log_probs"], ref_new) == 0.0
        assert out["weight_version"] == engine.stats()["weight_version"] == 1
        trainer.close()


def test_trainer_raises_when_the_engine_rejects(ckpts, seqs):
    """Both ends raise for a rejected update, and for lists that do not match."""
    old, new = ckpts
    new_weights = list(load_file(str(new / "model.safetensors")).items())
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        trainer = Trainer(engine)
        ref_old = engine.compute_log_probs(seqs)["log_probs"]
        bad = list(new_weights)
        bad[1] = (bad[1][0], bad[1][1].clone().fill_(float("inf")))
        trainer.conn.send((bad, 1 << 12))
        with pytest.raises(ValueError, match="holds NaN or inf"):
            engine.update_weights_from_distributed(*metadata_of(bad), bucket_bytes=1 << 12)
        status, message = trainer.reply()
        assert status == "err" and "an engine rank rejected the update" in message

        # the engine is told other lists than the trainer sends: both raise, nothing moves
        trainer.conn.send((new_weights, 1 << 12))
        names, dtypes, shapes = metadata_of(new_weights)
        with pytest.raises(ValueError, match="given different names"):
            engine.update_weights_from_distributed(names[::-1], dtypes[::-1], shapes[::-1],
                                                   bucket_bytes=1 << 12)
        status, message = trainer.reply()
        assert status == "err" and "given different names" in message

        with pytest.raises(ValueError, match="unknown weight name 'model.nope'"):
            trainer.send(engine, [("model.nope", torch.ones(2))])
        assert engine.compute_log_probs(seqs)["log_probs"] == ref_old
        assert engine.stats()["weight_version"] == 0
        trainer.close()


def test_plan_buckets_and_metadata_checks():
    meta = update_metadata(["a", "b", "c", "d"], [torch.float32, "bfloat16", "torch.float16",
                                                   torch.float32], [[3], [1000], [], [5, 2]])
    buckets = plan_buckets(meta, 64)
    assert buckets == [[(0, 0)], [(1, 0)], [(2, 0), (3, 16)]]
    with pytest.raises(TypeError, match=r"dtypes\[0\] must be a floating torch.dtype"):
        update_metadata(["a"], [torch.int64], [[1]])
    with pytest.raises(ValueError, match="one entry per tensor, got 2, 1 and 1"):
        update_metadata(["a", "b"], [torch.float32], [[1]])
    with pytest.raises(ValueError, match=r"shapes\[0\] \('a'\) must hold sizes >= 0"):
        update_metadata(["a"], [torch.float32], [[-1]])


tensor_specs = st.lists(st.tuples(st.sampled_from([torch.float32, torch.bfloat16,
                                                    torch.float16, torch.float64]),
                                   st.lists(st.integers(0, 9), max_size=3)),
                         max_size=8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=tensor_specs, bucket_bytes=st.integers(1, 600), seed=st.integers(0, 2**31 - 1))
def test_buckets_carry_any_tensors_exactly(specs, bucket_bytes, seed):
    """Random dtypes, shapes (empty and 0-d ones too) and bucket sizes: every tensor
    arrives bit for bit; tensors in a bucket never overlap, and a bucket stays under
    bucket_bytes unless one tensor alone is larger."""
    gen = torch.Generator().manual_seed(seed)
    weights = [(f"w{i}", torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
               for i, (dtype, shape) in enumerate(specs)]
    meta = update_metadata(*metadata_of(weights))
    for bucket in plan_buckets(meta, bucket_bytes):
        ends = [offset + t.numel() * t.element_size()
                for (i, offset), (_, t) in zip(bucket, (weights[i] for i, _ in bucket))]
        assert all(offset % ALIGN == 0 for _, offset in bucket)
        assert all(end <= nxt for end, (_, nxt) in zip(ends, bucket[1:]))
        # over budget only as one tensor alone (empty tensors take no bytes)
        assert sum(weights[i][1].numel() > 0 for i, _ in bucket) <= 1 or ends[-1] <= bucket_bytes
    assert [i for bucket in plan_buckets(meta, bucket_bytes) for i, _ in bucket] \
        == list(range(len(weights)))

    port, box = free_port(), []
    trainer = threading.Thread(target=lambda: box.append(init_weight_sync_group(
        "127.0.0.1", port, 0, 2, backend="gloo", timeout_s=30)))
    trainer.start()
    engine_end = init_weight_sync_group("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=30)
    trainer.join()
    sender = threading.Thread(target=send_weights, args=(weights, box[0]),
                              kwargs=dict(bucket_bytes=bucket_bytes))
    sender.start()
    got = receive_weights(engine_end, *metadata_of(weights), 0, lambda items, finite: None,
                          bucket_bytes=bucket_bytes)
    sender.join()
    assert [n for n, _ in got] == [n for n, _ in weights]
    for (_, a), (_, b) in zip(got, weights):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_ipc_handles_update_in_process(ckpts, seqs):
    """The IPC path's API on CPU tensors (shared memory); the GPU test crosses processes."""
    old, new = ckpts
    weights = load_file(str(new / "model.safetensors"))
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        engine.update_weights_from_ipc(ipc_handles(weights))
        out = engine.compute_log_probs(seqs)
        assert out["log_probs"] == fresh_scores(new, seqs) and out["weight_version"] == 1
        with pytest.raises(TypeError, match="is not an ipc_handles"):
            engine.update_weights_from_ipc({"lm_head.weight": (print, ("x",))})


def test_ipc_update_keeps_no_reference_to_the_trainers_tensors(ckpts, seqs, monkeypatch):
    """Once update_weights_from_ipc returns, accepted or rejected, no tensor it opened is
    alive, even while the caller keeps the error (its traceback's frames held them): the
    trainer may then free its memory or exit."""
    import tokenspeed.shard
    old, new = ckpts
    weights = load_file(str(new / "model.safetensors"))
    opened: list[weakref.ref] = []
    real_open = tokenspeed.shard.open_ipc_handles

    def recording_open(handles):
        tensors = real_open(handles)
        opened.extend(weakref.ref(t) for t in tensors.values())
        return tensors
    monkeypatch.setattr(tokenspeed.shard, "open_ipc_handles", recording_open)
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        bad = dict(weights)
        name = next(iter(bad))
        bad[name] = bad[name].clone()
        bad[name].view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match="holds NaN") as kept:
            engine.update_weights_from_ipc(ipc_handles(bad))
        gc.collect()
        assert len(opened) == len(bad) and all(ref() is None for ref in opened)
        assert kept.value.__traceback__ is not None
        assert engine.stats()["weight_version"] == 0

        opened.clear()
        engine.update_weights_from_ipc(ipc_handles(weights))
        gc.collect()
        assert len(opened) == len(weights) and all(ref() is None for ref in opened)
        assert engine.compute_log_probs(seqs)["log_probs"] == fresh_scores(new, seqs)


@pytest.mark.slow
def test_tp2_engine_ranks_each_keep_their_shard(ckpts, seqs):
    """tp_size 2 from a plain process: both workers join the group (ranks 1 and 2) and each
    keeps its shard; scores equal a fresh tp_size 1 engine on the new weights."""
    old, new = ckpts
    new_weights = list(load_file(str(new / "model.safetensors")).items())
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024, tp_size=2) as engine:
        trainer = Trainer(engine, tp_size=2)
        ref_old = engine.compute_log_probs(seqs)["log_probs"]
        bad = list(new_weights)
        bad[3] = (bad[3][0], bad[3][1][:-1])
        with pytest.raises(ValueError, match="expected shape"):
            trainer.send(engine, bad)
        assert engine.compute_log_probs(seqs)["log_probs"] == ref_old
        assert trainer.send(engine, new_weights) == ("ok", None)
        ref_new = fresh_scores(new, seqs)
        assert max_abs_diff(engine.compute_log_probs(seqs)["log_probs"], ref_new) <= 1e-5
        # the padded layout through the workers: one row per sequence, right-padded
        width = max(len(s["prompt_token_ids"]) + len(s["completion_token_ids"]) for s in seqs)
        ids, attn, resp = (torch.zeros(len(seqs), width, dtype=torch.int64) for _ in range(3))
        for b, s in enumerate(seqs):
            p, c = len(s["prompt_token_ids"]), len(s["completion_token_ids"])
            ids[b, :p + c] = torch.tensor(s["prompt_token_ids"] + s["completion_token_ids"])
            attn[b, :p + c], resp[b, p:p + c] = 1, 1
        out = engine.score_padded(ids, attn, resp)
        assert out["weight_version"] == 1
        assert max_abs_diff([out["log_probs"][b][resp[b] == 1].tolist()
                             for b in range(len(seqs))], ref_new) <= 1e-5
        trainer.close()


def _ipc_trainer(path: str, conn) -> None:
    """Fresh handles per "share"; on "done" (the engine dropped and synchronised everything
    it opened) frees its tensors and answers "bye": its memory outlives every use."""
    weights = {k: v.cuda() for k, v in load_file(path).items()}
    while (msg := conn.recv()) == "share":
        conn.send(ipc_handles(weights))
    assert msg == "done", msg
    del weights
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    conn.send("bye")


@pytest.mark.gpu
def test_ipc_from_another_process_equals_fresh_engine(ckpts, seqs):
    """Two updates from a trainer process, each with fresh handles, then the final
    handshake: the trainer frees its tensors only after the engine let go of them, and
    both ends shut down cleanly."""
    old, new = ckpts
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_ipc_trainer, args=(str(new / "model.safetensors"), child),
                       daemon=True)
    proc.start()
    child.close()  # a trainer that dies reads as EOF, not a hang

    def reply():
        assert conn.poll(120), "the trainer process did not answer"
        return conn.recv()
    kw = dict(device="cuda", dtype="float32", kv_cache_tokens=1024)
    try:
        with Engine(old, **kw) as engine:
            for _ in range(2):
                conn.send("share")
                engine.update_weights_from_ipc(reply())
            got = engine.compute_log_probs(seqs)
    finally:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
        conn.send("done")
        bye = reply()
        proc.join(60)
    assert bye == "bye" and proc.exitcode == 0
    assert got["weight_version"] == 2
    with Engine(new, **kw) as fresh:
        assert max_abs_diff(got["log_probs"], fresh.compute_log_probs(seqs)["log_probs"]) == 0.0


def _nccl_trainer(port: int, path: str, conn) -> None:
    torch.cuda.set_device(1)
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, backend="nccl")
    weights = [(k, v.cuda()) for k, v in load_file(path).items()]
    conn.send(metadata_of(weights))
    send_weights(weights, group, bucket_bytes=1 << 16)
    conn.send("done")


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_nccl_broadcast_between_two_gpus_equals_fresh_engine(ckpts, seqs):
    """NCCL refuses two ranks on one GPU: the trainer sits on GPU 1, the engine on GPU 0."""
    old, new = ckpts
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    port = free_port()
    proc = ctx.Process(target=_nccl_trainer, args=(port, str(new / "model.safetensors"), child),
                       daemon=True)
    proc.start()
    kw = dict(device="cuda:0", dtype="float32", kv_cache_tokens=1024)
    try:
        with Engine(old, **kw) as engine:
            engine.init_weight_sync_group("127.0.0.1", port, 1, 2, backend="nccl")
            engine.update_weights_from_distributed(*conn.recv(), bucket_bytes=1 << 16)
            assert conn.recv() == "done"
            got = engine.compute_log_probs(seqs)["log_probs"]
    finally:
        proc.join(60)
    with Engine(new, **kw) as fresh:
        assert max_abs_diff(got, fresh.compute_log_probs(seqs)["log_probs"]) == 0.0


@pytest.mark.parametrize("at", [0, 3, -1])  # -1: the final agreement
def test_interrupted_transfer_keeps_old_weights_and_breaks_the_group(ckpts, seqs, monkeypatch,
                                                                     at):
    """Ctrl-C in the engine at bucket ``at`` (-1: the final agreement): the old weights
    stay, the group is marked broken (its ranks are out of step) and refuses further
    transfers; a group made again works. The trainer, a thread here, times out."""
    old, new = ckpts
    new_weights = list(load_file(str(new / "model.safetensors")).items())
    meta = metadata_of(new_weights)
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        ref_old = engine.compute_log_probs(seqs)["log_probs"]

        def join(timeout_s: float) -> tuple[threading.Thread, list]:
            port, box = free_port(), []
            thread = threading.Thread(target=lambda: box.append(init_weight_sync_group(
                "127.0.0.1", port, 0, 2, backend="gloo", timeout_s=timeout_s)))
            thread.start()
            engine.init_weight_sync_group("127.0.0.1", port, 1, 2, backend="gloo",
                                          timeout_s=timeout_s)
            thread.join()
            return box[0]

        def send(group, errors: list) -> threading.Thread:
            def run():
                try:
                    send_weights(new_weights, group, bucket_bytes=1 << 12)
                except Exception as e:  # noqa: BLE001 - checked by the test
                    errors.append(e)
            thread = threading.Thread(target=run)
            thread.start()
            return thread

        group, errors = join(3.0), []
        sync = engine.shard.weight_sync
        calls = []
        real = {"broadcast": sync.broadcast, "agree": sync.agree}
        target = "agree" if at == -1 else "broadcast"

        def interrupted(name):
            def call(*args):
                calls.append(name)
                hit = (calls.count("agree") == 2 if at == -1
                       else calls.count("broadcast") == at + 1)
                if name == target and hit:
                    raise KeyboardInterrupt
                return real[name](*args)
            return call
        monkeypatch.setattr(sync, "broadcast", interrupted("broadcast"))
        monkeypatch.setattr(sync, "agree", interrupted("agree"))
        thread = send(group, errors)
        with pytest.raises(KeyboardInterrupt):
            engine.update_weights_from_distributed(*meta, bucket_bytes=1 << 12)
        thread.join()
        assert errors, "the trainer should have timed out"
        assert engine.compute_log_probs(seqs)["log_probs"] == ref_old
        with pytest.raises(RuntimeError, match="broke when a transfer stopped half-way"):
            engine.update_weights_from_distributed(*meta, bucket_bytes=1 << 12)

        group, errors = join(60.0), []
        thread = send(group, errors)
        engine.update_weights_from_distributed(*meta, bucket_bytes=1 << 12)
        thread.join()
        assert not errors
        assert engine.compute_log_probs(seqs)["log_probs"] == fresh_scores(new, seqs)


@pytest.mark.slow
def test_update_interrupted_by_a_timer_anywhere_holds_old_or_new(ckpts, seqs):
    """SIGINT at random moments of update_weights_from_distributed (the trainer a thread):
    afterwards the engine scores exactly as the old or the new weights, with the version
    to match, and a group left out of step refuses until it is made again."""
    old, new = ckpts
    sets = {path: list(load_file(str(path / "model.safetensors")).items()) for path in ckpts}
    refs = {path: fresh_scores(path, seqs) for path in ckpts}
    gen = torch.Generator().manual_seed(0)
    # the timer's SIGALRM becomes a SIGINT, which the engine may hold over its writes
    previous = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        outcomes = _interrupt_updates(sets, refs, old, new, seqs, gen)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes == {"done", "interrupted"}


def _interrupt_updates(sets, refs, old, new, seqs, gen) -> set[str]:
    """The loop of the test above; returns the outcomes seen."""
    with Engine(old, device="cpu", dtype="float32", kv_cache_tokens=1024) as engine:
        holds, group, outcomes = old, None, set()
        for _ in range(8):
            if group is not None and engine.shard.weight_sync.broken:
                with pytest.raises(RuntimeError, match="create it again on every rank"):
                    engine.update_weights_from_distributed(*metadata_of(sets[old]))
            if group is None or engine.shard.weight_sync.broken:
                port, box = free_port(), []
                joiner = threading.Thread(target=lambda: box.append(init_weight_sync_group(
                    "127.0.0.1", port, 0, 2, backend="gloo", timeout_s=3)))
                joiner.start()
                engine.init_weight_sync_group("127.0.0.1", port, 1, 2, backend="gloo",
                                              timeout_s=3)
                joiner.join()
                group = box[0]
            target = new if holds == old else old
            version = engine.stats()["weight_version"]
            sender = threading.Thread(target=_send_quietly, args=(sets[target], group))
            sender.start()
            delay = float(torch.rand(1, generator=gen)) * 0.05
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                engine.update_weights_from_distributed(*metadata_of(sets[target]),
                                                       bucket_bytes=1 << 12)
                signal.setitimer(signal.ITIMER_REAL, 0)
                outcomes.add("done")
            except KeyboardInterrupt:
                outcomes.add("interrupted")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            sender.join()
            got = engine.compute_log_probs(seqs)["log_probs"]
            assert got in (refs[old], refs[new])
            now = old if got == refs[old] else new
            assert engine.stats()["weight_version"] == version + (now != holds)
            holds = now
    return outcomes


def _send_quietly(weights, group) -> None:
    """send_weights as a trainer thread that may time out when the engine was stopped."""
    try:
        send_weights(weights, group, bucket_bytes=1 << 12)
    except Exception:  # noqa: BLE001 - the engine side is what the test checks
        pass
