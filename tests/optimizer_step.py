"""The optimizer-step transient of a real DeepSpeed engine on the CPU, beside the memory model and the simulation.

    python tests/optimizer_step.py OUT.json

For full and LoRA at ZeRO-0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer around torch AdamW, as a GPU plan
runs) and fp32, it builds the engine the trainer builds for a small GPT-2, runs two iterations and counts,
with torch's MemTracker (trainer/simulate._tracker), the bytes the second optimizer step allocates above what was live before it
(the fp32 gradient copies and Adam's temporaries). The same step on fake tensors (trainer/simulate.py, with
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

from trainer import planner  # noqa: E402
from trainer.adapters import apply_mode  # noqa: E402
from trainer.config import DEFAULTS  # noqa: E402
from trainer.engine import create_engine  # noqa: E402
from trainer.model import LMWithLoss, build_model  # noqa: E402
from trainer.simulate import _tracker, simulate  # noqa: E402

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 384, "block_size": 64}
DATA_VOCAB = 65


def measure(mode, dtype):
    cfg = {**DEFAULTS, **SHAPE, "init_from": "scratch", "mode": mode, "zero_stage": 0, "offload": "none",
           "dtype": dtype, "batch_size": 2, "gradient_accumulation_steps": 1, "micro_batch_size": 2,
           "gradient_checkpointing": False, "dropout": 0.0, "lora_dropout": 0.0}
    shape = {**{k: SHAPE[k] for k in ("n_layer", "n_head", "n_embd")}, "vocab_size": 128}
    hw = planner.Hardware("cpu", 64 * 2**30, 1, False, "CPU")
    plan = planner.make_plan({**cfg, **shape}, hw)
    torch.manual_seed(0)
    model = apply_mode(build_model(cfg, DATA_VOCAB), plan, cfg)
    engine, _ = create_engine(LMWithLoss(model), cfg, plan, 1, on_gpu=False)
    x = torch.randint(0, DATA_VOCAB, (2, SHAPE["block_size"]))
    for it in range(2):
        engine.backward(engine(x, x))
        if it == 0:
            engine.step()
    # every tensor alive before the step is known to the tracker, so in-place updates of parameters and
    # states do not count as new memory: what is counted is what the step allocates
    gc.collect()
    tracker = _tracker()
    tracker.track_external(*[t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.device.type == "cpu"])
    with tracker:
        before = sum(d["Total"] for d in tracker.get_tracker_snapshot("current").values())
        engine.step()
    real = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values()) - before
    sim = simulate({**cfg, **shape}, shape, plan, foreach=False).items["optimizer_step_transient"]
    return {"mode": mode, "dtype": dtype, "optimizer": type(engine.optimizer).__name__, "real": real,
            "simulated": sim, "estimated": plan.memory["optimizer_step_transient"]}


def main(out):
    deepspeed.init_distributed(dist_backend="gloo")
    records = [measure(mode, dtype) for mode in ("full", "lora") for dtype in ("bf16", "fp32")]
    Path(out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
