"""Setup of a training run: everything the loop needs, built once from the resolved config.

build_run(cfg): the run's final config (resume, max_epochs) -> data -> plan -> model and adapters
-> DeepSpeed engine -> sampler -> logger -> resume state, returned as one Run. The loop
(trainer/run/loop.py) only iterates over it; an out-of-memory step-down (trainer/run/oom.py) rebuilds the
model and engine through the same base_model/build_module (trainer/model/builder.py) and build_engine, and
updates the Run in place. On several ranks it first checks that every rank sees rank 0's out_dir and its
own copy of the same data (trainer/run/preflight.py). Nothing is written until every input has been
checked, except that check's marker file, which is removed whatever the outcome.
"""
import math
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from trainer.config import ADAPTER_MODES, Config
from trainer.data.mixing import MixedData, epochs_to_iters, open_data
from trainer.data.sampler import TrainSampler
from trainer.data.tokenizer import CharTokenizer, Gpt2Tokenizer, load_tokenizer
from trainer.data.tokens import TokenData
from trainer.errors import UserError
from trainer.metrics import require_metric_packages
from trainer.model.attention import packed_kernel
from trainer.model.builder import base_model, build_module
from trainer.model.gpt2 import count_parameters
from trainer.model.shapes import Shape, flops_per_token, model_shape
from trainer.plan.hardware import Hardware, detect_hardware
from trainer.plan.planner import Plan, PlanInput, make_plan
from trainer.plan.report import format_plan, plan_to_dict
from trainer.run import checkpoint, checkpoint_load, continuation, fault_injection
from trainer.run.engine import clips_by_hand, create_engine, ensure_cpu_adam, may_offload
from trainer.run.interrupts import stop_point
from trainer.run.logger import RunLogger, require_wandb
from trainer.run.preflight import check_same_data, check_shared_out_dir, on_every_rank, same_hardware
from trainer.run.ranks import barrier, rank_and_world
from trainer.run.resume import Resume, resume_config, resume_layout
from trainer.run.run_dir import RunDir
from trainer.startup import CLOCK, format_phases


@dataclass
class Run:
    """One training run: what setup built, and the little state the loop advances."""
    cfg: Config              # the resolved config, final (trainer/config.py declares every key)
    out_dir: Path
    rank: int
    world: int
    data: TokenData | MixedData
    shape: Shape              # the model's shape, as the planner plans for it
    plan_input: PlanInput     # what the planner read (a step-down plans from it again)
    hw: Hardware
    plan: Plan
    engine: DeepSpeedEngine | None  # None only while a step-down rebuilds it
    ds_config: dict[str, Any]
    sampler: TrainSampler
    log: RunLogger
    n_params: int
    n_trainable: int = 0      # MFU: adapter runs do weight-gradient matmuls for these only
    iter_num: int = 0
    best_val_loss: float = math.inf
    start_iter: int = 0       # nothing new to save before the first step after a start or resume
    evals_without_improvement: int = 0  # for early_stop
    history: list[dict[str, Any]] = field(default_factory=list)  # out-of-memory step-downs, as plan.json has them

    @cached_property
    def tokenizer(self) -> Gpt2Tokenizer | CharTokenizer:
        """Built at the first sample or answer (GPT-2's BPE tables take a few tenths of a second to load)."""
        return load_tokenizer(self.data.meta)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device(self):
        return self.engine.device

    @property
    def adapters_only(self):
        """Checkpoints hold the adapters only (the frozen base is rebuilt from init_from)."""
        return self.plan.mode in ADAPTER_MODES

    @property
    def clips_by_hand(self):
        return clips_by_hand(self.plan)

    @property
    def sequences(self):
        return self.cfg.batch_size * self.cfg.gradient_accumulation_steps

    @property
    def tokens_per_iter(self):
        return self.sequences * self.cfg.block_size

    @property
    def flops_per_token(self):
        s = self.shape
        return flops_per_token(self.n_params, s.n_layer, s.n_head, s.n_embd, self.cfg.block_size,
                               self.plan.mode, self.n_trainable)

    @property
    def plan_dict(self):
        """plan.json: the plan, and after a step-down the history of changes."""
        plan = plan_to_dict(self.plan)
        return {**plan, "history": list(self.history)} if self.history else plan

    def client_state(self):
        """What a checkpoint saves beside DeepSpeed's states."""
        return {"iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "config": self.cfg.to_dict(),
                "plan": self.plan_dict, "sampler": self.sampler.state_dict(),
                "evals_without_improvement": self.evals_without_improvement}


# ----------------------------------------------------------------------------- the run's config

def check_out_dir(cfg):
    """A fresh run refuses an out_dir holding another run's checkpoints, unless overwrite=True (nothing is touched
    yet). A run folder without a checkpoint (stopped during its setup) is taken as it is."""
    out_dir = Path(cfg.out_dir)
    taken = bool(checkpoint.complete_tags(out_dir))
    if cfg.init_from != "resume" and taken and not cfg.overwrite:
        raise UserError(f"out_dir {out_dir} already holds a run; resume it with --init_from=resume, "
                        f"choose another --out_dir, or pass --overwrite=True to replace it")
    return out_dir


def final_config(cfg, out_dir, world):
    """(cfg, data, resume, notes): the config the run trains with, once.

    On resume the model keys, mode and ZeRO stage come from the run, and from another run or a nanoGPT
    checkpoint the keys its weights fix; max_epochs > 0 becomes
    max_iters (and lr_decay_iters) from the data's size. `notes` are lines for the console.
    """
    resume, start = None, None
    if cfg.init_from == "resume":
        cfg = resume_config(cfg, out_dir)
        tag = checkpoint.choose_tag(out_dir, cfg.resume_tag)
        cfg, universal = resume_layout(cfg, checkpoint.read_info(out_dir, tag), world)
        resume = Resume(tag, universal)
    else:  # a new run from another run's out_dir or a nanoGPT checkpoint (trainer/run/continuation.py)
        start = continuation.starting_point(cfg)
        cfg = start.cfg if start else cfg
    data = open_data(cfg)  # one dataset, or a MixedData for a list of them
    if cfg.eval_generate:  # answers are scored at every evaluation: instructions and the scorers needed
        if not data.packed:
            raise UserError(f"eval_generate={cfg.eval_generate} answers the instructions of the val split, but "
                            f"dataset={cfg.dataset!r} is text; train on instruction data (data/prepare.py "
                            f"--format=instructions) or leave eval_generate=0")
        require_metric_packages(f"eval_generate={cfg.eval_generate}")
    notes = []
    if start:
        continuation.check_vocabulary(start, data)
        notes.append(start.note)
    if cfg.max_epochs > 0:
        cfg, line = epochs_to_iters(cfg, data)
        notes.append(line)
    if len(data.names) > 1:
        notes.append(f"mixing datasets ({cfg.mix}): {data.describe()}")
    return cfg, data, resume, notes


# ----------------------------------------------------------------------------- model and engine

def build_engine(run, module, plan, universal=False):
    """The DeepSpeed engine of a plan for this run (and the test-only fault hooks when their variables are set)."""
    engine, ds_config = create_engine(module, run.cfg, plan, run.world, run.hw.device_type == "cuda",
                                      load_universal=universal)
    fault_injection.install(engine, run)
    return engine, ds_config


def build_trained_module(cfg, plan, vocab_size, device_type, model_config=None, run_dir=None):
    """The module of a plan, as training and a step-down build it (trainer/model/builder.py)."""
    base = base_model(cfg, plan, vocab_size, device_type, model_config, run_dir)
    return build_module(cfg, plan, base, packed_kernel(device_type, cfg.dropout))


# ----------------------------------------------------------------------------- the run

def stage_done(stage):
    """A stage of the setup is over: the start-up clock's mark (trainer/startup.py), then a signal's stop point."""
    CLOCK.mark(stage)
    stop_point(stage)


def report_startup(run):
    """Before the first iteration: the start-up's phases, printed with log_level=debug, logged either way."""
    phases = CLOCK.finish()
    if run.cfg.log_level == "debug":
        run.log.print(format_phases(phases))
    run.log.json_text("startup", {phase: round(seconds, 3) for phase, seconds in phases.items()})


def claim_out_dir(cfg, rank):
    """Once every input is known good: clear a run being overwritten, create out_dir."""
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        if cfg.init_from != "resume" and cfg.overwrite:
            shutil.rmtree(checkpoint.checkpoint_dir(out_dir), ignore_errors=True)
            for events in out_dir.glob("events.out.tfevents.*"):
                events.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()


def build_run(cfg, hardware=None):
    """The whole setup of a training run (see the module docstring); returns the Run."""
    rank, world = rank_and_world()
    check_shared_out_dir(Path(cfg.out_dir), rank, world)  # its marker is the only write before the checks
    out_dir = check_out_dir(cfg)
    cfg, data, resume, notes = on_every_rank(final_config, cfg, out_dir, world)  # each rank opens its own data
    check_same_data(data)
    stage_done("checking the data and the run")

    saved_model = RunDir(out_dir).model_config_path if resume else continuation.model_config(cfg)
    # the model's shape, and whether batches are packed instruction blocks: what the planner plans for
    shape = model_shape(cfg, data.vocab_size, saved_model)
    plan_input = PlanInput.of(cfg, shape, packed=bool(data.packed))
    hw = same_hardware(detect_hardware(world, **(hardware or {})))
    plan = make_plan(plan_input, hw)
    if may_offload(plan, cfg, hw):
        ensure_cpu_adam()  # built now, not hours in when a step-down first offloads
    stage_done("planning")

    full_resume = resume is not None and plan.mode not in ADAPTER_MODES  # adapter runs rebuild their base
    module = build_trained_module(cfg, plan, data.vocab_size, hw.device_type,
                                  saved_model if full_resume or not resume else None,
                                  run_dir=out_dir if resume else None)
    if resume is None:
        continuation.load_weights(module, cfg)  # a new run from another run's weights or adapters
    data.check_vocab(module.lm.config.vocab_size)
    if cfg.wandb_log:
        require_wandb()
    stage_done("loading the model")

    # Every input checked: only now is anything written.
    claim_out_dir(cfg, rank)
    wandb_run = {"project": cfg.wandb_project, "name": cfg.wandb_run_name, "config": cfg.to_dict()} \
        if cfg.wandb_log else None
    log = RunLogger(out_dir, rank == 0, cfg.tensorboard, cfg.max_iters, 0, wandb_run)
    log.print(format_plan(plan))
    for line in notes:
        log.print(line)
    total, trainable = count_parameters(module)
    log.print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)")

    run = Run(cfg=cfg, out_dir=out_dir, rank=rank, world=world, data=data, shape=shape, plan_input=plan_input, hw=hw,
              plan=plan, engine=None, ds_config={}, sampler=TrainSampler(data, cfg.seed), log=log,
              n_params=total, n_trainable=trainable)
    run.engine, run.ds_config = build_engine(run, module, plan, universal=bool(resume and resume.universal))
    torch.manual_seed(cfg.seed + rank)  # dropout differs by rank, as in nanoGPT
    stage_done("building the engine")

    if resume is not None:
        load_resume_state(run, resume)
        stage_done("loading the checkpoint")
    if run.master:
        RunDir(out_dir).write(cfg, module.lm.config, run.plan_dict, data.meta)
    log.json_text("config", cfg.to_dict())
    log.json_text("plan", run.plan_dict)
    log.json_text("deepspeed_config", run.ds_config)
    stage_done("writing the run's files")
    if log.bar is not None:
        log.bar.reset(total=cfg.max_iters)
        log.bar.update(run.iter_num)
    log.print(f"tokens per iteration: {run.tokens_per_iter:,} ({run.sequences} sequences of {cfg.block_size}; "
              f"micro-batch {plan.micro_batch_size} x {plan.grad_accum_per_rank} accumulation x {world} ranks)")
    return run


def load_resume_state(run, resume):
    """Weights, optimizer, iteration, best val loss and the data sampler's position from the checkpoint."""
    if resume.universal:
        run.log.print("the checkpoint was saved on another number of ranks: converting it to DeepSpeed's "
                      "universal format")
        checkpoint_load.to_universal(run.out_dir, resume.tag)
    state = checkpoint_load.load(run.engine, run.out_dir, resume.tag, run.adapters_only, resume.universal)
    run.iter_num = run.start_iter = state["iter_num"]
    run.best_val_loss = state["best_val_loss"]
    run.evals_without_improvement = state.get("evals_without_improvement", 0)  # absent from older checkpoints
    run.sampler.load_state_dict(state["sampler"])
    run.log.print(f"resumed from iteration {run.iter_num} (best val loss {run.best_val_loss:.4f})")
