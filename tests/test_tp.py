"""Tensor parallelism: tp=2 against tp=1 in both launches (SPMD ranks that initialise their
own process group, as under torchrun, and a single process whose Engine spawns its
workers), partials vs gathered logits, the rich outputs and an MoE model on every rank,
update_weights, rejected calls on every rank, and the data-parallel helper. gloo on the
CPU; the same tests on NCCL with 2+ GPUs."""
from __future__ import annotations

import shutil
import signal
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_factory import make_checkpoint, max_abs_diff, random_sequences
from test_moe_models import grpo_sequences, moe_checkpoint

from tokenspeed import Engine
from tokenspeed.parallel.dp import compute_log_probs_dp
from tokenspeed.parallel.launch import free_port

pytest.importorskip("transformers")
TOL = 1e-5
WORLD = 2
SPMD_TIMEOUT_S = 300
# tiny chunks and pages, prefix cache on: every sequence spans several steps
SETTINGS = dict(page_size=4, max_batch_tokens=8, kv_cache_tokens=256, enable_prefix_cache=True,
                dtype="float32")
# odd vocabularies split unevenly over 2 ranks; 1 KV head is replicated, 2 are split
CHECKPOINTS = {
    "LlamaForCausalLM": dict(vocab=131, kv_heads=1, seed=1),
    "Qwen2ForCausalLM": dict(vocab=97, kv_heads=2, tied=True, seed=2),
    "Qwen3ForCausalLM": dict(vocab=101, kv_heads=2, seed=3),
}
NEW_WEIGHTS = dict(vocab=101, kv_heads=2, seed=4)  # Qwen3, another draw
# the rich outputs on the Qwen3 checkpoint: every filter, top-k and requested ids, one
# sequence overriding top_k
RICH_ARCH = "Qwen3ForCausalLM"
RICH = dict(top_k=10, top_p=0.85, min_p=0.02, top_logprobs=6, token_ids=[1, 50, 96],
            return_entropy=True)
MOE_SETTINGS = dict(SETTINGS, max_batch_tokens=16, kv_cache_tokens=512)

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.multi_gpu])]


def workload(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(vocab)
    seqs = random_sequences(gen, vocab, 6)
    # a GRPO group whose page-aligned prompt hits the prefix cache on the second pass
    prompt = torch.randint(0, vocab, (12,), generator=gen).tolist()
    return seqs + [{"prompt_token_ids": prompt,
                    "completion_token_ids": torch.randint(0, vocab, (3 + i,),
                                                          generator=gen).tolist()}
                   for i in range(3)]


def rich_workload() -> list[dict]:
    seqs = workload(CHECKPOINTS[RICH_ARCH]["vocab"])
    seqs[1] = dict(seqs[1], top_k=0)
    return seqs


def moe_workload() -> list[dict]:
    return grpo_sequences(torch.Generator().manual_seed(8), 257, groups=2, size=3)


def rich_scores(engine: Engine) -> dict:
    return engine.compute_log_probs(rich_workload(), 0.9, **RICH)


def moe_scores(engine: Engine) -> list[dict]:
    """Twice (the second pass reads the prefix cache), with the routing captured."""
    return [engine.compute_log_probs(moe_workload(), return_routed_experts=True)
            for _ in range(2)]


def assert_rich_close(got: dict, want: dict) -> None:
    """tp=2's rich outputs against tp=1's: the same -inf (filtered out) places and top-k
    ids, every finite value within TOL."""
    def close(a: list[float], b: list[float]) -> None:
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        assert torch.equal(torch.isneginf(a), torch.isneginf(b))
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a))
        if fin.any():
            assert (a[fin] - b[fin]).abs().max().item() <= TOL

    assert got["tokens"] == want["tokens"]
    for i in range(len(want["log_probs"])):
        close(got["log_probs"][i], want["log_probs"][i])
        close(got["entropy"][i], want["entropy"][i])
        assert got["top_logprobs"][i]["ids"] == want["top_logprobs"][i]["ids"]
        for a, b in zip(got["top_logprobs"][i]["logprobs"], want["top_logprobs"][i]["logprobs"]):
            close(a, b)
        for a, b in zip(got["token_ids_logprobs"][i], want["token_ids_logprobs"][i]):
            close(a, b)


BAD = [{"prompt_token_ids": [1, 2], "completion_token_ids": [3]},
       {"prompt_token_ids": [1], "completion_token_ids": [10_000]}]


def score_twice(engine: Engine, seqs: list[dict]) -> list[dict]:
    """Two passes: the second reads the prefix cache the first filled."""
    return [engine.compute_log_probs(seqs, 0.7, return_entropy=True) for _ in range(2)]


def assert_close(got: dict, ref: dict) -> None:
    assert got["tokens"] == ref["tokens"]
    assert max_abs_diff(got["log_probs"], ref["log_probs"]) <= TOL
    assert max_abs_diff(got["entropy"], ref["entropy"]) <= TOL


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a rank waiting on a collective would block forever."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    out = {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, **kw)
           for arch, kw in CHECKPOINTS.items()}
    out["new"] = make_checkpoint(tmp_path_factory.mktemp("new"), "Qwen3ForCausalLM",
                                 **NEW_WEIGHTS)
    # the same config with a truncated weights file: loading fails, validation does not
    corrupt = tmp_path_factory.mktemp("corrupt")
    shutil.copy(out["new"] / "config.json", corrupt / "config.json")
    weights = (out["new"] / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out["corrupt"] = corrupt
    out["moe"] = moe_checkpoint(tmp_path_factory.mktemp("moe"), "Qwen3MoeForCausalLM", seed=8,
                                heads=4, kv_heads=2)
    return out


def device_of(device: str, rank: int = 0) -> str:
    return f"cuda:{rank}" if device == "cuda" else "cpu"


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(ckpts, device) -> dict[str, dict]:
    """tp=1 scores of each checkpoint's workload (and of the updated-weights model)."""
    out = {}
    for arch in (*CHECKPOINTS, "new"):
        with Engine(ckpts[arch], device=device_of(device), **SETTINGS) as engine:
            vocab = engine.model_config.vocab_size
            out[arch] = engine.compute_log_probs(workload(vocab), 0.7, return_entropy=True)
    with Engine(ckpts[RICH_ARCH], device=device_of(device), **SETTINGS) as engine:
        out["rich"] = rich_scores(engine)
    with Engine(ckpts["moe"], device=device_of(device), **MOE_SETTINGS) as engine:
        out["moe"] = moe_scores(engine)
    return out


def _spmd_rank(rank: int, device: str, port: int, ckpts: dict[str, Path], out_dir: Path) -> None:
    """One rank, as torchrun would start it: its own process group, the same calls."""
    result: dict = {}
    try:
        torch.set_num_threads(1)
        dev = device_of(device, rank)
        if device == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD)
        kw = dict(SETTINGS, device=dev, tp_size=WORLD)
        for arch in CHECKPOINTS:
            seqs = workload(CHECKPOINTS[arch]["vocab"])
            for mode in ("partials", "gather"):
                with Engine(ckpts[arch], logprob_mode=mode, **kw) as engine:
                    result[arch, mode] = score_twice(engine, seqs)
                    result[arch, mode, "stats"] = engine.stats()
        for mode in ("partials", "gather"):
            with Engine(ckpts[RICH_ARCH], logprob_mode=mode, **kw) as engine:
                result["rich", mode] = rich_scores(engine)
        with Engine(ckpts["moe"], **dict(kw, **MOE_SETTINGS)) as engine:
            result["moe"] = moe_scores(engine)
            result["moe", "stats"] = engine.stats()
        from safetensors.torch import load_file
        seqs = workload(NEW_WEIGHTS["vocab"])
        with Engine(ckpts["Qwen3ForCausalLM"], **kw) as engine:
            score_twice(engine, seqs)
            engine.update_weights(load_file(ckpts["new"] / "model.safetensors"))
            result["update"] = engine.compute_log_probs(seqs, 0.7, return_entropy=True)
            result["update", "stats"] = engine.stats()
            errors = []
            for batch in (BAD, BAD if rank == 0 else BAD[:1], seqs if rank == 0 else seqs[1:]):
                try:
                    engine.compute_log_probs(batch)
                    errors.append(None)
                except ValueError as e:
                    errors.append(str(e))
            result["errors"] = errors
            result["after_errors"] = engine.compute_log_probs(seqs, 0.7, return_entropy=True)
        # a shard that fails to load on one rank: every rank raises, none waits
        path = ckpts["new"] if rank == 0 else ckpts["corrupt"]
        try:
            Engine(path, **kw)
            result["load_error"] = None
        except Exception as e:  # noqa: BLE001 - the test reads the message
            result["load_error"] = str(e)
        with Engine(ckpts["new"], **dict(kw, tp_size=1)) as engine:
            result["dp"] = compute_log_probs_dp(engine, seqs, 0.7, return_entropy=True)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        result = {"traceback": traceback.format_exc()}
    torch.save(result, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def spmd(ckpts, device, tmp_path_factory) -> list[dict]:
    """Both ranks' results of one SPMD run; fails (rather than hangs) past a deadline."""
    out_dir = tmp_path_factory.mktemp(f"spmd_{device}")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_spmd_rank, args=(r, device, port, ckpts, out_dir))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(SPMD_TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} did not finish within {SPMD_TIMEOUT_S} s"
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "traceback" not in res, f"rank {r} failed:\n{res['traceback']}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("arch", CHECKPOINTS)
def test_spmd_tp2_equals_tp1(spmd, reference, arch):
    for res in spmd:
        first, second = res[arch, "partials"]
        assert_close(first, reference[arch])
        assert_close(second, reference[arch])  # from the prefix cache
        assert res[arch, "partials", "stats"]["prefix_hit_tokens"] > 0
    # every rank returns the same result, bit for bit
    assert spmd[0][arch, "partials"] == spmd[1][arch, "partials"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", CHECKPOINTS)
def test_spmd_partials_and_gathered_logits_agree(spmd, reference, arch):
    for res in spmd:
        for got, partial in zip(res[arch, "gather"], res[arch, "partials"]):
            assert_close(got, partial)
            assert_close(got, reference[arch])
    assert spmd[0][arch, "gather"] == spmd[1][arch, "gather"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["partials", "gather"])
def test_spmd_rich_outputs_same_on_every_rank_and_match_tp1(spmd, reference, mode):
    """Filtered log-probs, entropy, top-k and requested ids: bitwise the same on every
    rank (the ranks merge the same gathered partials in rank order), tp=1's within TOL."""
    assert spmd[0]["rich", mode] == spmd[1]["rich", mode]
    assert_rich_close(spmd[0]["rich", mode], reference["rich"])


@pytest.mark.slow
def test_spmd_moe_same_on_every_rank_and_matches_tp1(spmd, reference):
    """An MoE model: scores and captured routing bitwise the same on every rank, both
    passes (the second from the prefix cache); scores tp=1's within TOL, routing equal."""
    assert spmd[0]["moe"] == spmd[1]["moe"]
    assert spmd[0]["moe", "stats"]["prefix_hit_tokens"] > 0
    for got, want in zip(spmd[0]["moe"], reference["moe"]):
        assert max_abs_diff(got["log_probs"], want["log_probs"]) <= TOL
        assert got["routed_experts"] == want["routed_experts"]


@pytest.mark.slow
def test_spmd_update_weights_equals_fresh_engine(spmd, reference):
    for res in spmd:
        assert_close(res["update"], reference["new"])
        assert res["update", "stats"]["weight_version"] == 1
        assert res["update", "stats"]["cached_pages"] > 0  # refilled after the flush


@pytest.mark.slow
def test_spmd_bad_batch_raises_on_every_rank(spmd, reference):
    """The same bad batch on both ranks, a bad batch on rank 0 only, and different
    batches on the ranks: every rank raises and stays usable (no rank hangs: the
    fixture would fail past its deadline)."""
    same, one_rank, different = zip(*(res["errors"] for res in spmd))
    assert all(e and "sequence 1: completion_token_ids[0] is 10000" in e for e in same)
    assert one_rank[0] and "sequence 1: completion_token_ids[0] is 10000" in one_rank[0]
    assert one_rank[1] and "rank(s) [0] rejected" in one_rank[1]
    assert all(e and "ranks [1] were given different input" in e for e in different)
    for res in spmd:
        assert_close(res["after_errors"], reference["new"])


@pytest.mark.slow
def test_spmd_load_failure_on_one_rank_raises_on_every_rank(spmd):
    """Rank 1's shard file is truncated: it raises its own error, rank 0 raises too
    (the fixture's deadline proves neither waited in a collective)."""
    assert spmd[1]["load_error"] and "rank" not in spmd[1]["load_error"].split(":")[0]
    assert spmd[0]["load_error"] and "rank(s) [1] rejected" in spmd[0]["load_error"]


@pytest.mark.slow
def test_data_parallel_helper_gathers_in_order(spmd, reference):
    for res in spmd:
        assert_close(res["dp"], reference["new"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", CHECKPOINTS)
def test_single_process_tp2_equals_tp1(ckpts, reference, device, arch):
    seqs = workload(CHECKPOINTS[arch]["vocab"])
    with deadline(SPMD_TIMEOUT_S), Engine(ckpts[arch], device=device, tp_size=WORLD,
                                          **SETTINGS) as engine:
        for out in score_twice(engine, seqs):
            assert_close(out, reference[arch])
        stats = engine.stats()
        assert stats["tp_size"] == WORLD and stats["prefix_hit_tokens"] > 0
        tensors = engine.compute_log_probs(seqs, 0.7, return_tensors=True)
        assert tensors["mask"].sum().item() == sum(len(s["completion_token_ids"]) for s in seqs)


@pytest.mark.slow
def test_single_process_update_weights_and_bad_batches(ckpts, reference, device):
    from safetensors.torch import load_file
    seqs = workload(NEW_WEIGHTS["vocab"])
    new = load_file(ckpts["new"] / "model.safetensors")
    with deadline(SPMD_TIMEOUT_S), Engine(ckpts["Qwen3ForCausalLM"], device=device,
                                          tp_size=WORLD, **SETTINGS) as engine:
        old = engine.compute_log_probs(seqs, 0.7, return_entropy=True)
        assert max_abs_diff(old["log_probs"], reference["new"]["log_probs"]) > 1e-2
        with pytest.raises(ValueError, match="completion_token_ids.0. is 10000"):
            engine.compute_log_probs(BAD)
        with pytest.raises(ValueError, match="up_proj.*shape"):
            engine.update_weights({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
        assert engine.stats()["weight_version"] == 0
        engine.update_weights(iter(new.items()))
        assert engine.stats()["weight_version"] == 1
        assert_close(engine.compute_log_probs(seqs, 0.7, return_entropy=True), reference["new"])
        # a session over the workers: one merged call per step, a bad part rejected alone
        with engine.session(0.7, return_entropy=True) as session:
            first, second = session.add(seqs[:2]), session.add(seqs[2:])
            with pytest.raises(ValueError, match="completion_token_ids.0. is 10000"):
                session.add(BAD)
            assert session.step() == [first, second]
            out = {key: first.result()[key] + second.result()[key]
                   for key in ("log_probs", "entropy", "tokens")}
        assert second.result()["weight_version"] == 1
        assert_close(out, reference["new"])
    with pytest.raises(RuntimeError, match="closed"):
        engine.stats()


def test_unshardable_models_are_rejected_before_any_worker_starts(ckpts):
    with pytest.raises(ValueError, match="tp_size 3 does not divide num_attention_heads 4"):
        Engine(ckpts["Qwen3ForCausalLM"], tp_size=3, **SETTINGS)
    with pytest.raises(ValueError, match="logprob_mode"):
        Engine(ckpts["Qwen3ForCausalLM"], tp_size=2, logprob_mode="topk", **SETTINGS)


@pytest.mark.slow
def test_single_process_interrupted_calls_never_shift_replies(ckpts, reference, device):
    """Ctrl-C while the workers compute: the call raises KeyboardInterrupt, the workers
    (which ignore it) finish, and every later call still gets its own reply."""
    import _thread
    import random
    import threading
    import time
    arch = "Qwen3ForCausalLM"
    seqs = workload(CHECKPOINTS[arch]["vocab"])
    long_call = seqs * 8
    rng = random.Random(7)
    interrupted = 0
    with deadline(SPMD_TIMEOUT_S), Engine(ckpts[arch], device=device, tp_size=WORLD,
                                          **SETTINGS) as engine:
        for _ in range(6):
            timer = threading.Timer(rng.uniform(0.0, 0.05), _thread.interrupt_main)
            try:
                timer.start()
                engine.compute_log_probs(long_call, 1.3)
                timer.join()
                time.sleep(0.01)
            except KeyboardInterrupt:
                interrupted += 1
            assert_close(engine.compute_log_probs(seqs, 0.7, return_entropy=True),
                         reference[arch])
            assert engine.stats()["running"] == 0
        assert interrupted >= 3
