"""The step inside the backward (optimizer_in_backward) on real CPU engines, against the ordinary step.

    python tests/optimizer_in_backward.py OUT.json

A small GPT-2 in bf16, full mode, one micro-step per iteration, for each of TOOLS (master_weights+optimizer):
optimi's own gradient release (bf16_kahan), and the hooks that step torchao's optimizers one tensor at a time
(bf16_sr+adamw4bit) or torch's AdamW (bf16: deterministic, so its steps compare exactly). Two engines from the
same weights, one with the step in the backward and one ordinary (the trainer's per-iteration code: its
clip_or_skip, then DeepSpeed's step), two iterations each on the same batch; written to OUT.json, per tool:
  exact           grad_clip 0: every tensor equal (torch.equal) after each iteration; with stochastic rounding
                  (bf16_sr) the tensors draw their random bits in another order, so: every element within one
                  bf16 rounding step of the ordinary step's (the update itself the same), each iteration
                  from the same weights; and the tensors the update did not move (plain bf16 loses LayerNorm
                  weights' updates below 1.0's rounding step; none with stochastic rounding)
  per_tensor      grad_clip tiny: equal to the ordinary step whose gradients are clipped tensor by tensor, and
                  not to the ordinary step's global clip (so the clipping is per tensor); deterministic tools only
  bytes           after a backward with the step in it: the engine's gradients, weights and optimizer states
                  (tests/engine_states.classify) beside the plan's estimate
  nonfinite       a finite loss with one non-finite gradient (sqrt at 0 on one weight): NonFiniteGradient names
                  it and that tensor is left unstepped
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from engine_states import DATA_VOCAB, classify, live_storages  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.model.builder import build_module  # noqa: E402
from trainer.model.gpt2 import build_model  # noqa: E402
from trainer.model.shapes import model_shape  # noqa: E402
from trainer.optim.release import NonFiniteGradient  # noqa: E402
from trainer.plan.hardware import detect_hardware  # noqa: E402
from trainer.plan.planner import PlanInput, make_plan  # noqa: E402
from trainer.run.engine import clip_or_skip, create_engine  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
TOOLS = {"bf16_kahan+adamw": ("bf16_kahan", "adamw"), "bf16+adamw": ("bf16", "adamw"),
         "bf16_sr+adamw4bit": ("bf16_sr", "adamw4bit"), "bf16+adam_mini": ("bf16", "adam_mini")}


def engine_of(released, grad_clip, tools):
    masters, optimizer = TOOLS[tools]
    cfg = Config(**{**SHAPE, "init_from": "scratch", "dropout": 0.0, "mode": "full", "dtype": "bf16",
                    "master_weights": masters, "optimizer": optimizer, "optimizer_in_backward": released,
                    "batch_size": 2,
                    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "grad_clip": grad_clip,
                    "learning_rate": 1e-3})
    plan = make_plan(PlanInput.of(cfg, model_shape(cfg, DATA_VOCAB)), detect_hardware(1))
    torch.manual_seed(0)
    engine, _ = create_engine(build_module(cfg, plan, build_model(cfg, DATA_VOCAB), "dense_mask"), cfg, plan, 1,
                              False)
    return engine, plan


def batch():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, DATA_VOCAB, (2, SHAPE["block_size"]), generator=gen) for _ in range(2)]


def iterate(engine, x, y, grad_clip, per_tensor=False):
    """One iteration as trainer/run/loop.micro_steps runs it (one micro-step)."""
    loss = engine(x, y)
    release = engine.gradient_release
    if release is None or release.finite(loss):
        engine.backward(loss)
    if release is None:
        if per_tensor:  # the reference for per-tensor clipping: each gradient clipped on its own
            for p in engine.module.parameters():  # (its norm in fp32, as the hook's)
                norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                torch.nn.utils.clip_grads_with_norm_([p], grad_clip, norm)
        else:
            clip_or_skip(engine, grad_clip)
    engine.step()
    return release.take_norm() if release is not None else None


def weights(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def same(a, b, rounded):
    """Equal, or (stochastic rounding) each element within one bf16 rounding step (the spacing at it) of b's."""
    if not rounded:
        return torch.equal(a, b)
    step = torch.maximum(torch.finfo(torch.bfloat16).eps * b.float().abs(),
                         torch.tensor(torch.finfo(torch.bfloat16).tiny))
    return bool(((a.float() - b.float()).abs() <= step).all())


def compare(grad_clip, per_tensor, tools):
    x, y = batch()
    rounded = TOOLS[tools][0] == "bf16_sr"
    released, _ = engine_of(True, grad_clip, tools)
    ordinary, _ = engine_of(False, grad_clip, tools)
    equal, norms, start = [], [], weights(ordinary)
    for _ in range(2):
        norms.append(iterate(released, x, y, grad_clip))
        iterate(ordinary, x, y, grad_clip, per_tensor)
        a, b = weights(released), weights(ordinary)
        equal.append(all(same(a[n], b[n], rounded) for n in a))
        if rounded:  # the next iteration from the same weights (else last step's rounding changes its gradients)
            for n, p in ordinary.module.named_parameters():
                p.data.copy_(a[n])
    out = {"equal": equal, "norms": norms,
           "unmoved": [n for n in b if torch.equal(start[n], b[n])]}
    if per_tensor:  # the same with the ordinary global clip: must differ
        globally, _ = engine_of(False, grad_clip, tools)
        for _ in range(2):
            iterate(globally, x, y, grad_clip)
        g, a = weights(globally), weights(released)
        out["equal_to_global_clip"] = all(torch.equal(a[n], g[n]) for n in a)
        globally.destroy()
    released.destroy()
    ordinary.destroy()
    return out


def measure_bytes(tools):
    x, y = batch()
    base = live_storages()
    engine, plan = engine_of(True, 1.0, tools)
    for _ in range(2):
        loss = engine(x, y)
        engine.backward(loss)
        del loss
        during = classify(engine, base, everything=False)  # after the backward: every gradient released
        engine.step()
    measured = classify(engine, base)
    measured["gradients"] = during["gradients"]
    record = {"predicted": plan.estimate.states, "measured": measured,
              "held_grads": sum(p.grad is not None for p in engine.module.parameters())}
    engine.destroy()
    return record


def nonfinite(tools):
    x, y = batch()
    engine, _ = engine_of(True, 1.0, tools)
    # the first layer's attention weight: its gradient completes late in the backward, after most tensors stepped
    weight = next(p for n, p in engine.module.named_parameters() if ".h.0." in n and p.dim() == 2)
    before = weights(engine)
    loss = engine(x, y) + torch.sqrt(weight.view(-1)[0] * 0.0)  # finite (0), its gradient inf * 0 = nan
    raised = None
    try:
        engine.backward(loss)
    except NonFiniteGradient as exc:
        raised = str(exc)
    after = weights(engine)
    name = next(n for n, p in engine.module.named_parameters() if p is weight)
    record = {"raised": raised, "name": name, "unstepped": torch.equal(before[name], after[name]),
              "stepped_before_it": [n for n in before if not torch.equal(before[n], after[n])]}
    engine.destroy()
    return record


def main():
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    deepspeed.init_distributed()
    result = {}
    for tools, (masters, _) in TOOLS.items():
        result[tools] = {"exact": compare(0.0, False, tools)}
        if masters != "bf16_sr":
            result[tools]["per_tensor"] = compare(1e-3, True, tools)
        if masters != "bf16":  # (plain bf16: the same hooks as bf16_sr's, its states counted as torch's)
            result[tools].update(bytes=measure_bytes(tools), nonfinite=nonfinite(tools))
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
