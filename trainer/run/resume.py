"""Resuming a run: which keys come from the run, which from the command, and how a checkpoint saved on
another number of ranks or ZeRO stage is loaded."""
from dataclasses import dataclass, replace

from trainer.config import DEFAULTS, GRAD_ACCUM_DTYPES
from trainer.optim.optimizer import is_8bit, unpaged
from trainer.errors import UserError
from trainer.plan.memory import saved_deepspeed_path
from trainer.run.run_dir import CONFIG, RunDir

# Keys that fix the model a checkpoint holds: a resume takes them from the run.
RUN_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset", "mode", "lora_r", "lora_alpha",
                  "lora_targets", "use_dora", "use_rslora", "lora_init", "loraplus_lr_ratio")


@dataclass
class Resume:
    tag: str          # the checkpoint to load
    universal: bool   # saved on another number of ranks: load through DeepSpeed's universal format


def resume_config(cfg, out_dir):
    """On resume the model's shape and source come from the run; training keys from the command."""
    run_dir = RunDir(out_dir)
    if not run_dir.is_run():
        raise UserError(f"init_from='resume' but {out_dir / CONFIG} does not exist; start a new run without "
                        f"--init_from=resume")
    saved_cfg = run_dir.config()
    if cfg.dataset != saved_cfg.dataset and cfg.dataset != DEFAULTS["dataset"]:  # sequential finetuning
        raise UserError(f"{out_dir} trained on dataset={saved_cfg.dataset!r} and a resume continues the same run on "
                        f"the same data, but this run asks for dataset={cfg.dataset!r}; to continue its model on "
                        f"other data, start a new run from it: --init_from={out_dir} --out_dir=<a new folder> "
                        f"--dataset={cfg.dataset!r}")
    merged_cfg = replace(cfg)
    for key in RUN_MODEL_KEYS:
        # A value the recipe or command asks for (not the default) must match the run's.
        if getattr(cfg, key) != getattr(saved_cfg, key) and getattr(cfg, key) != DEFAULTS[key]:
            raise UserError(f"{out_dir} holds a model with {key}={getattr(saved_cfg, key)!r}, but this run asks for "
                            f"{key}={getattr(cfg, key)!r}; resume with the run's own settings or start a new out_dir")
        setattr(merged_cfg, key, getattr(saved_cfg, key))
    merged_cfg.init_from = saved_cfg.init_from
    merged_cfg.resumed_from = str(out_dir)
    if saved_cfg.continued_from:  # a run started from another run's weights stays so
        merged_cfg.continued_from = saved_cfg.continued_from
    return merged_cfg


def resume_layout(cfg, info, world):
    """Resume keeps the saved mode and ZeRO stage; another rank count goes through a universal checkpoint.

    Returns (cfg, universal). DeepSpeed re-partitions ZeRO-1/2/3 optimizer states for a new number of
    ranks only from its universal format; a ZeRO-0 checkpoint holds whole states and loads anywhere.
    """
    cfg = replace(cfg)
    if cfg.mode == "auto":
        cfg.mode = info["mode"]
    if cfg.zero_stage == "auto":
        cfg.zero_stage = info["zero_stage"]
    saved_optimizer = info.get("optimizer", "adamw")  # checkpoints from before the optimizer key: torch's AdamW
    if cfg.optimizer == "auto":
        cfg.optimizer = saved_optimizer
    elif unpaged(cfg.optimizer) != unpaged(saved_optimizer):  # paging does not change the states
        raise UserError(f"the checkpoint holds {saved_optimizer}'s optimizer states, not {cfg.optimizer}'s; "
                        f"resume with --optimizer={saved_optimizer}")
    saved_masters = info.get("master_weights", "fp32")  # checkpoints from before the key: fp32 masters
    if cfg.master_weights == "auto":
        cfg.master_weights = saved_masters
    elif cfg.master_weights != saved_masters:
        raise UserError(f"the checkpoint holds master_weights={saved_masters} (its optimizer states are of that "
                        f"kind), not {cfg.master_weights}; resume with --master_weights={saved_masters}")
    saved_released = info.get("optimizer_in_backward", False)  # optimi keeps a step count per tensor, or per group
    if cfg.optimizer_in_backward == "auto":
        cfg.optimizer_in_backward = saved_released
    elif cfg.optimizer_in_backward != saved_released:
        raise UserError(f"the checkpoint holds optimizer_in_backward={saved_released} (its optimizer states are of "
                        f"that kind), not {cfg.optimizer_in_backward}; resume with "
                        f"--optimizer_in_backward={saved_released}")
    if "grad_accum_dtype" in info and cfg.grad_accum_dtype == "auto":
        cfg.grad_accum_dtype = info["grad_accum_dtype"] if info["grad_accum_dtype"] in GRAD_ACCUM_DTYPES \
            else "auto"
    saved, wanted = info["zero_stage"], cfg.zero_stage
    if cfg.mode != info["mode"]:
        raise UserError(f"the checkpoint was trained in {info['mode']} mode, not {cfg.mode}; "
                        f"resume with --mode={info['mode']}")
    # a ZeRO-0 plan's engine may be partitioned too (the bf16_optimizer path: trainer/plan/memory.deepspeed_path)
    partitioned = saved_deepspeed_path(info).engine_stage >= 1
    universal = partitioned and (world != info["world_size"] or wanted != saved)
    if universal and is_8bit(saved_optimizer):
        raise UserError(f"the checkpoint's {saved_optimizer} states are partitioned over {info['world_size']} ranks "
                        f"at ZeRO-{saved}, and DeepSpeed's universal checkpoint (how a run moves to another number of "
                        f"ranks or stage) knows only AdamW's 32-bit moments; resume on {info['world_size']} ranks with "
                        f"--zero_stage={saved}")
    if wanted != saved and (saved == 0 or wanted == 0):
        raise UserError(f"cannot resume a ZeRO-{saved} checkpoint with zero_stage={wanted}; "
                        f"resume with --zero_stage={saved}")
    return cfg, universal
