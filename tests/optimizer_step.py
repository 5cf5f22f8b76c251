"""The optimizer-step transient of a real DeepSpeed engine on the CPU, beside the memory model and the simulation.

    python tests/optimizer_step.py OUT.json

For full and LoRA at ZeRO-0 in bf16 with bf16 accumulation (DeepSpeed's FP16_UnfusedOptimizer around torch AdamW, as a GPU plan
runs) and fp32, it builds the engine the trainer builds for a small GPT-2, runs two iterations and counts,
with torch's MemTracker (trainer/plan/simulate.peak_tracker), the bytes the second optimizer step allocates above what was live before it
(the fp32 gradient copies and Adam's temporaries). The same step on fake tensors (trainer/plan/simulate.py, with
torch's per-tensor AdamW as on the CPU) and the memory model's CPU estimate are written beside it.
"""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ.get("MASTER_PORT", "29611"))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from trainer.config import Config  # noqa: E402
from trainer.model.builder import build_module  # noqa: E402
from trainer.model.gpt2 import build_model  # noqa: E402
from trainer.model.shapes import Shape  # noqa: E402
from trainer.plan.hardware import Hardware  # noqa: E402
from trainer.plan.planner import PlanInput, make_plan  # noqa: E402
from trainer.plan.simulate import peak_tracker, simulate  # noqa: E402
from trainer.run.engine import create_engine  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 384, "block_size": 64}
DATA_VOCAB = 65


def measure(mode, dtype, accum, optimizer):
    cfg = Config(**{**SHAPE, "init_from": "scratch", "mode": mode, "zero_stage": 0, "offload": "none", "dtype": dtype,
                    "grad_accum_dtype": accum, "optimizer": optimizer, "master_weights": "fp32", "batch_size": 2,
                    "gradient_accumulation_steps": 1, "micro_batch_size": 2, "gradient_checkpointing": False,
                    "dropout": 0.0, "lora_dropout": 0.0})
    shape = Shape(SHAPE["n_layer"], SHAPE["n_head"], SHAPE["n_embd"], 128, SHAPE["block_size"])
    hw = Hardware("cpu", 64 * 2**30, 1, False, "CPU")
    plan = make_plan(PlanInput.of(cfg, shape), hw)
    torch.manual_seed(0)
    module = build_module(cfg, plan, build_model(cfg, DATA_VOCAB), "dense_mask")
    engine, _ = create_engine(module, cfg, plan, 1, on_gpu=False)
    x = torch.randint(0, DATA_VOCAB, (2, SHAPE["block_size"]))
    for it in range(2):
        engine.backward(engine(x, x))
        if it == 0:
            engine.step()
    # every tensor alive before the step is known to the tracker, so in-place updates of parameters and
    # states do not count as new memory: what is counted is what the step allocates
    gc.collect()
    tracker = peak_tracker()
    tracker.track_external(*[t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.device.type == "cpu"])
    with tracker:
        before = sum(d["Total"] for d in tracker.get_tracker_snapshot("current").values())
        engine.step()
    real = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values()) - before
    # bitsandbytes' CPU kernels have no fake twin that allocates as they do: the simulation is CUDA's (in place)
    sim = simulate(cfg, shape, plan, cpu_step=True).items["optimizer_step_transient"] if optimizer == "adamw" else None
    return {"mode": mode, "dtype": dtype, "grad_accum_dtype": accum, "optimizer_name": optimizer,
            "optimizer": type(engine.optimizer).__name__, "real": real, "simulated": sim,
            "estimated": plan.estimate.items["optimizer_step_transient"]}


CASES = [(mode, *case) for mode in ("full", "lora") for case in (("bf16", "bf16", "adamw"), ("fp32", "fp32", "adamw"),
                                                                  ("fp32", "fp32", "adamw8bit"))]


def main(out):
    deepspeed.init_distributed(dist_backend="gloo")
    records = [measure(*case) for case in CASES]
    Path(out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
