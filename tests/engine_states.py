"""Count the bytes of the tensors a real DeepSpeed engine holds, next to the planner's prediction.

    python tests/engine_states.py OUT.json                   # one rank
    deepspeed --num_gpus 2 tests/engine_states.py OUT.json   # two CPU ranks

For full and LoRA modes and ZeRO stages 0-3 it plans a small GPT-2 (fp32 on the CPU), builds
the engine the trainer builds (trainer/model/builder.py, trainer/run/engine.py), runs two
iterations of two micro-batches per rank, and counts every tensor storage alive in the
process (gc), sorted into:
  weights           storages of the module's parameters (ZeRO-3: partitions and whole persistent ones)
  optimizer_states  the torch optimizer's states and its parameters when they are not the module's
                    (the fp32 master partitions of ZeRO)
  buckets           DeepSpeed's gradient buckets (ipg), less the gradients accumulated inside them
                    (ZeRO-1/2; under ZeRO-3 a p.grad in a bucket is a copy on its way to the partition)
  gradients         everything else that is new: p.grad, ZeRO's gradient partitions, small flags
Weights and optimizer states are counted after the second step (every storage in the process),
gradients and buckets at their largest after a backward pass of the second iteration (the
storages reachable from the engine: its optimizer's attributes, the module's parameters and grads). Rank 0 writes one record per configuration to OUT.json.
"""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.config import Config  # noqa: E402
from trainer.model.builder import build_module  # noqa: E402
from trainer.model.gpt2 import build_model  # noqa: E402
from trainer.model.shapes import model_shape  # noqa: E402
from trainer.plan.hardware import detect_hardware  # noqa: E402
from trainer.plan.planner import PlanInput, make_plan  # noqa: E402
from trainer.run.engine import create_engine  # noqa: E402
from trainer.run.ranks import release_cpu_allreduce_buffer  # noqa: E402

DATA_VOCAB = 65  # a character vocabulary: the scratch model pads it to 128
# n_embd 384: the projections (>= 147,456 elements) are above ZeRO-3's persistence threshold,
# the embeddings, biases, LayerNorms and LoRA matrices under it, as in the real GPT-2 sizes.
SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 384, "block_size": 64}
# (mode, ZeRO stage, optimizer); ZeRO-3 last: it rewires the module in place, and engines are built one after another
CONFIGS = [("full", 0, "adamw"), ("full", 1, "adamw"), ("full", 2, "adamw"), ("lora", 0, "adamw"), ("lora", 1, "adamw"),
           ("lora", 2, "adamw"), ("full", 0, "adamw8bit"), ("full", 2, "adamw8bit"), ("lora", 0, "adamw8bit"),
           ("full", 0, "adam_mini"), ("full", 3, "adamw"), ("lora", 3, "adamw"), ("full", 3, "adamw8bit")]
# `engine_states.py OUT.json bf16`: bf16 training on one rank, fp32 masters (BF16_Optimizer) and each bf16 weights
# setting (master_weights: the client optimizer on the bf16 module), full mode, ZeRO-0: (master_weights, optimizer)
BF16_CONFIGS = [("fp32", "adamw"), ("bf16_kahan", "adamw"), ("bf16_sr", "adamw"), ("bf16", "adamw"),
                ("bf16_sr", "adamw4bit"), ("bf16", "adam_mini")]


def storage(t):
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    if isinstance(t, torch._subclasses.FakeTensor):  # torch.compile's tracing copies (torchao's step): no data
        return None
    if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass (torchao's 4-bit states): its inner tensors count
        return None
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def live_storages():
    gc.collect()  # cyclic garbage holding tensors would otherwise count as the engine's
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and (s := storage(obj)):
            out[s[0]] = s[1]
    return out


def tensors_under(obj, name_filter=None, path="", depth=0, seen=None, out=None):
    """Storages of the tensors reachable from obj through attributes, lists and dicts."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen or depth > 5:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor) and hasattr(obj, "__tensor_flatten__"):
        for name in obj.__tensor_flatten__()[0]:  # each inner tensor itself (a temporary list's id is reused)
            tensors_under(getattr(obj, name), name_filter, path, depth + 1, seen, out)
    elif isinstance(obj, torch.Tensor):
        if (s := storage(obj)) and (name_filter is None or name_filter in path):
            out[s[0]] = s[1]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            tensors_under(v, name_filter, f"{path}[{k if isinstance(k, (str, int)) else '.'}]", depth + 1, seen, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors_under(v, name_filter, path, depth + 1, seen, out)
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        for k, v in vars(obj).items():
            tensors_under(v, name_filter, f"{path}.{k}", depth + 1, seen, out)
    return out


def inner_optimizer(engine):
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def classify(engine, base, everything=True):
    """Bytes of the new storages by kind (see the module docstring).

    everything: every storage alive in the process (gc); otherwise only those reachable from the
    engine (its optimizer's attributes and the module's parameters), which is much faster.
    """
    found = live_storages() if everything else {**tensors_under(engine.optimizer), **tensors_under(
        [(p, getattr(p, "ds_tensor", None)) for p in engine.module.parameters()])}
    new = {p: b for p, b in found.items() if p not in base}
    for p in engine.module.parameters():  # autograd's p.grad may have no Python object for gc to find
        if p.grad is not None and (s := storage(p.grad)) and s[0] not in base:
            new[s[0]] = s[1]
    weights = {}
    for p in engine.module.parameters():
        for t in (p, getattr(p, "ds_tensor", None)):
            if (s := storage(t)):
                weights[s[0]] = s[1]
    opt = inner_optimizer(engine)
    optim = tensors_under(opt.state)
    masters = list(opt.state) + [p for group in opt.param_groups for p in group["params"]]
    for p in masters:
        if (s := storage(p)):
            optim[s[0]] = s[1]
    optim = {p: b for p, b in optim.items() if p not in weights}
    grad_views = {}
    for p in engine.module.parameters():
        if p.grad is not None and (s := storage(p.grad)):
            grad_views[(s[0], p.grad.storage_offset())] = p.grad.numel() * p.grad.element_size()
    ipg = {p: b for p, b in tensors_under(engine.optimizer, "ipg").items() if p not in weights and p not in optim}
    # p.grad are the gradients even where they live inside a bucket (ZeRO-1 accumulates them there),
    # except under ZeRO-3, whose gradients are the partitions and p.grad only a view being reduced
    staging = engine.zero_optimization_stage() == 3
    in_buckets = 0 if staging else sum(b for (ptr, _), b in grad_views.items() if ptr in ipg)
    w = sum(weights.values())
    o = sum(optim.values())
    buckets = max(0, sum(ipg.values()) - in_buckets)
    return {"weights": w, "optimizer_states": o, "buckets": buckets,
            "gradients": sum(new.values()) - sum(b for p, b in new.items() if p in weights or p in optim)
            - buckets}


def measure(mode, zero, optimizer, world, dtype="auto", master_weights="auto"):
    micro, accum = 1, 2
    cfg = Config(**{**SHAPE, "init_from": "scratch", "dropout": 0.0, "mode": mode, "zero_stage": zero,
                    "offload": "none", "micro_batch_size": micro, "gradient_checkpointing": False,
                    "optimizer": optimizer, "batch_size": micro, "gradient_accumulation_steps": accum * world,
                    "lora_dropout": 0.0, "dtype": dtype, "master_weights": master_weights})
    hw = detect_hardware(world)
    plan = make_plan(PlanInput.of(cfg, model_shape(cfg, DATA_VOCAB)), hw)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, DATA_VOCAB, (micro, SHAPE["block_size"]), generator=gen)
    y = torch.randint(0, DATA_VOCAB, (micro, SHAPE["block_size"]), generator=gen)
    base = live_storages()
    torch.manual_seed(0)
    model = build_module(cfg, plan, build_model(cfg, DATA_VOCAB), "dense_mask")
    engine, _ = create_engine(model, cfg, plan, world, False)
    gradients = buckets = 0
    for it in range(2):  # the second iteration is the steady state: DeepSpeed sets some buffers up lazily
        for _ in range(accum):
            loss = engine(x, y)
            engine.backward(loss)
            if it == 1:
                during = classify(engine, base, everything=False)
                gradients, buckets = max(gradients, during["gradients"]), max(buckets, during["buckets"])
            engine.step()
    del loss
    measured = classify(engine, base)
    measured.update(gradients=gradients, buckets=buckets)
    est = plan.estimate
    record = {"mode": mode, "zero_stage": zero, "optimizer": optimizer, "ranks": world, "dtype": plan.dtype,
              "master_weights": plan.master_weights,
              "params_total": est.params_total,
              "params_trainable": est.params_trainable, "predicted": est.states,
              "predicted_buckets": est.items["ds_buckets"], "measured": measured}
    engine.destroy()
    del engine, model
    gc.collect()
    return record


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    out, bf16 = args[0], args[1:] == ["bf16"]
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    deepspeed.init_distributed()
    release_cpu_allreduce_buffer()  # as launch/train.py does: no 66 MiB file per rank left in /dev/shm
    world = dist.get_world_size()
    if bf16:
        records = [measure("full", 0, optimizer, world, "bf16", masters) for masters, optimizer in BF16_CONFIGS]
    else:
        records = [measure(mode, zero, optimizer, world) for mode, zero, optimizer in CONFIGS]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
