"""A GRPO-style loop with tokenspeed scoring old-policy log-probs for a trainer in another
process, on the built-in tiny model, on the CPU, in seconds:

    python examples/grpo_loop.py --steps 3

Each step: rollouts (random tokens here; a sampler in real life) -> the engine scores the
padded batch (score_padded) -> the trainer checks those scores against its own forward,
takes a GRPO step with random rewards and broadcasts its new weights over a gloo group
(send_weights / update_weights_from_distributed) -> the engine's scores must equal a
fresh engine built from the trainer's new model (Engine.from_hf_model).

Needs transformers (the trainer's model). On GPUs pass backend="nccl" to both ends.
"""
from __future__ import annotations

import argparse
import multiprocessing

import torch

from tokenspeed import Engine
from tokenspeed.builtin import CONFIG, builtin_model_dir, builtin_weights
from tokenspeed.parallel.launch import free_port
from tokenspeed.weight_sync import init_weight_sync_group, metadata_of, send_weights

GROUPS, GROUP_SIZE = 4, 4  # prompts per step, completions per prompt
CLIP, LR = 0.2, 1e-2


def hf_model():
    import transformers
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.load_state_dict(builtin_weights(), strict=False)  # the rotary buffers are derived
    return model


def rollouts(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GRPO batch as a trainer holds it: prompts left-padded, responses right-padded,
    joined into [B, L] ids with an attention and a response mask."""
    vocab, batch = CONFIG["vocab_size"], GROUPS * GROUP_SIZE
    prompt_w, response_w = 12, 10
    ids = torch.zeros(batch, prompt_w + response_w, dtype=torch.int64)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for g in range(GROUPS):
        p = int(torch.randint(2, prompt_w + 1, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (p,), generator=gen)
        for k in range(GROUP_SIZE):
            b = g * GROUP_SIZE + k
            r = int(torch.randint(1, response_w + 1, (1,), generator=gen))
            ids[b, prompt_w - p:prompt_w] = prompt
            ids[b, prompt_w:prompt_w + r] = torch.randint(0, vocab, (r,), generator=gen)
            attn[b, prompt_w - p:prompt_w + r] = 1
            resp[b, prompt_w:prompt_w + r] = 1
    return ids, attn, resp


def token_log_probs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The trainer's own [B, L] log p(token | tokens before it): HF's padded forward with
    positions from the mask; position 0 of each row gets 0."""
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


def trainer(port: int, conn) -> None:
    """The training process: rank 0 of the weight-sync group."""
    torch.manual_seed(0)
    model = hf_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    group = init_weight_sync_group("127.0.0.1", port, 0, 2, backend="gloo")
    while (msg := conn.recv()) is not None:
        ids, attn, resp, old_lp = msg
        lp = token_log_probs(model, ids, attn)
        mask = resp.bool()
        gap = (lp.detach() - old_lp)[mask].abs().max().item()
        assert gap < 1e-4, f"engine's old-policy scores are {gap} away from the trainer's"
        rewards = torch.rand(GROUPS, GROUP_SIZE)
        adv = ((rewards - rewards.mean(1, keepdim=True))
               / (rewards.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        ratio = torch.exp(lp - old_lp)
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - CLIP, 1 + CLIP) * adv)
        loss = -(surrogate * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        weights = model.state_dict()
        conn.send((metadata_of(weights.items()), loss.item(), gap))
        send_weights(weights, group)
        conn.send({k: v.clone() for k, v in weights.items()})  # for the check only


def main(steps: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=trainer, args=(port, child), daemon=True)
    proc.start()
    kw = dict(device="cpu", dtype="float32")
    engine = Engine(builtin_model_dir(), **kw)
    try:
        engine.init_weight_sync_group("127.0.0.1", port, 1, 2, backend="gloo")
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            ids, attn, resp = rollouts(gen)
            old = engine.score_padded(ids, attn, resp)
            conn.send((ids, attn, resp, old["log_probs"]))
            meta, loss, gap = conn.recv()
            engine.update_weights_from_distributed(*meta)
            model = hf_model()
            model.load_state_dict(conn.recv(), strict=False)
            with Engine.from_hf_model(model, **kw) as fresh:
                ours = engine.score_padded(ids, attn, resp)
                theirs = fresh.score_padded(ids, attn, resp)
            assert torch.equal(ours["log_probs"], theirs["log_probs"])
            assert ours["weight_version"] == step + 1
            print(f"step {step}: loss {loss:+.4f}, engine vs trainer {gap:.1e}, "
                  f"weights v{ours['weight_version']} synced and match a fresh engine")
        conn.send(None)
    finally:
        engine.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    main(parser.parse_args().steps)
