"""Setup of a training run: everything the loop needs, built once from the resolved config.

build_run(cfg): the run's final config (resume, max_epochs) -> data -> plan -> model and adapters
-> DeepSpeed engine -> sampler -> logger -> resume state, returned as one Run. The loop
(trainer/loop.py) only iterates over it; an out-of-memory step-down (trainer/oom.py) rebuilds the
model and engine through the same build_module and build_engine and updates the Run in place.
On several ranks it first checks that every rank sees rank 0's out_dir and its own copy of the same
data (docs/multinode.md). Nothing is written until every input has been checked, except that check's
marker file, which is removed whatever the outcome.
"""
import json
import math
import pickle
import secrets
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from trainer import checkpoint, faults, planner
from trainer.adapters import apply_mode, build_base
from trainer.config import ADAPTER_MODES, DEFAULTS
from trainer.data import TrainSampler
from trainer.engine import clips_by_hand, create_engine, ensure_cpu_adam, may_offload
from trainer.errors import UserError
from trainer.mixing import epochs_to_iters, open_data
from trainer.model import (LMWithLoss, build_model, count_parameters, enable_checkpointing, model_from_config_file,
                           packed_kernel, remove_biases)
from trainer.ranks import all_gather_objects, barrier, node_name, rank_and_world
from trainer.run_logger import RunLogger, flops_per_token, require_wandb
from trainer.tokenizer import load_tokenizer

# What a run writes beside its checkpoints (sampling, evaluation, export and resume read them).
RUN_FILES = ("config.json", "model_config.json", "plan.json", "meta.pkl")
# Keys that fix the model a checkpoint holds: a resume takes them from the run.
RUN_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset", "mode", "lora_r", "lora_alpha",
                  "lora_targets")


@dataclass
class Resume:
    tag: str          # the checkpoint to load
    universal: bool   # saved on another number of ranks: load through DeepSpeed's universal format


@dataclass
class Run:
    """One training run: what setup built, and the little state the loop advances."""
    cfg: dict
    out_dir: Path
    rank: int
    world: int
    data: object              # TokenData, or MixedData for a list of datasets
    shape: dict               # n_layer, n_head, n_embd, vocab_size, packed (what the planner plans for)
    hw: planner.Hardware
    plan: planner.Plan
    engine: object            # the DeepSpeed engine around LMWithLoss
    ds_config: dict
    sampler: TrainSampler
    log: RunLogger
    tokenizer: object
    n_params: int
    n_trainable: int = 0      # MFU: adapter runs do weight-gradient matmuls for these only
    iter_num: int = 0
    best_val_loss: float = math.inf
    start_iter: int = 0       # nothing new to save before the first step after a start or resume
    evals_without_improvement: int = 0  # for early_stop
    history: list = field(default_factory=list)  # out-of-memory step-downs, as plan.json records them

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
        return self.cfg["batch_size"] * self.cfg["gradient_accumulation_steps"]

    @property
    def tokens_per_iter(self):
        return self.sequences * self.cfg["block_size"]

    @property
    def flops_per_token(self):
        s = self.shape
        return flops_per_token(self.n_params, s["n_layer"], s["n_head"], s["n_embd"], self.cfg["block_size"],
                               self.plan.mode, self.n_trainable)

    @property
    def plan_dict(self):
        """plan.json: the plan, and after a step-down the history of changes."""
        plan = planner.plan_to_dict(self.plan)
        return {**plan, "history": list(self.history)} if self.history else plan

    def client_state(self):
        """What a checkpoint saves beside DeepSpeed's states."""
        return {"iter_num": self.iter_num, "best_val_loss": self.best_val_loss, "config": self.cfg,
                "plan": self.plan_dict, "sampler": self.sampler.state_dict(),
                "evals_without_improvement": self.evals_without_improvement}


# ----------------------------------------------------------------------------- the run's config

def check_out_dir(cfg):
    """A fresh run refuses an out_dir holding another run, unless overwrite=True (nothing is touched yet)."""
    out_dir = Path(cfg["out_dir"])
    taken = (out_dir / "config.json").exists() or checkpoint.checkpoint_dir(out_dir).exists()
    if cfg["init_from"] != "resume" and taken and not cfg["overwrite"]:
        raise UserError(f"out_dir {out_dir} already holds a run; resume it with --init_from=resume, "
                        f"choose another --out_dir, or pass --overwrite=True to replace it")
    return out_dir


def resume_config(cfg, out_dir):
    """On resume the model's shape and source come from the run; training keys from the command."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise UserError(f"init_from='resume' but {path} does not exist; start a new run without --init_from=resume")
    saved = json.loads(path.read_text())
    merged = dict(cfg)
    for key in RUN_MODEL_KEYS:
        # A value the recipe or command asks for (not the default) must match the run's.
        if cfg[key] != saved[key] and cfg[key] != DEFAULTS[key]:
            raise UserError(f"{out_dir} holds a model with {key}={saved[key]!r}, but this run asks for "
                            f"{key}={cfg[key]!r}; resume with the run's own settings or start a new out_dir")
        merged[key] = saved[key]
    merged["init_from"] = saved["init_from"]
    merged["resumed_from"] = str(out_dir)
    return merged


def resume_layout(cfg, info, world):
    """Resume keeps the saved mode and ZeRO stage; another rank count goes through a universal checkpoint.

    Returns (cfg, universal). DeepSpeed re-partitions ZeRO-1/2/3 optimizer states for a new number of
    ranks only from its universal format; a ZeRO-0 checkpoint holds whole states and loads anywhere.
    """
    cfg = dict(cfg)
    if cfg["mode"] == "auto":
        cfg["mode"] = info["mode"]
    if cfg["zero_stage"] == "auto":
        cfg["zero_stage"] = info["zero_stage"]
    saved, wanted = info["zero_stage"], cfg["zero_stage"]
    if cfg["mode"] != info["mode"]:
        raise UserError(f"the checkpoint was trained in {info['mode']} mode, not {cfg['mode']}; "
                        f"resume with --mode={info['mode']}")
    # a ZeRO-0 plan saved through the fast bf16 path (DeepSpeed ZeRO-1) holds partitioned states too
    partitioned = max(saved, info.get("engine_zero_stage", saved)) >= 1
    universal = partitioned and (world != info["world_size"] or wanted != saved)
    if wanted != saved and (saved == 0 or wanted == 0):
        raise UserError(f"cannot resume a ZeRO-{saved} checkpoint with zero_stage={wanted}; "
                        f"resume with --zero_stage={saved}")
    return cfg, universal


def final_config(cfg, out_dir, world):
    """(cfg, data, resume, notes): the config the run trains with, once.

    On resume the model keys, mode and ZeRO stage come from the run; max_epochs > 0 becomes
    max_iters (and lr_decay_iters) from the data's size. `notes` are lines for the console.
    """
    resume = None
    if cfg["init_from"] == "resume":
        cfg = resume_config(cfg, out_dir)
        tag = checkpoint.choose_tag(out_dir, cfg["resume_tag"])
        cfg, universal = resume_layout(cfg, checkpoint.read_info(out_dir, tag), world)
        resume = Resume(tag, universal)
    data = open_data(cfg)  # one dataset, or a MixedData for a list of them
    notes = []
    if cfg["max_epochs"] > 0:
        cfg, line = epochs_to_iters(cfg, data)
        notes.append(line)
    if len(data.names) > 1:
        notes.append(f"mixing datasets ({cfg['mix']}): {data.describe()}")
    return cfg, data, resume, notes


# ----------------------------------------------------------------------------- model and engine

def build_module(cfg, plan, vocab_size, device_type, model_config=None, run_dir=None):
    """What DeepSpeed trains for a plan: LMWithLoss around the GPT-2, checkpointing and adapters applied.

    model_config: rebuild that saved architecture (weights come from a checkpoint or the old engine);
    else adapter modes build the frozen base from init_from (4-bit for qlora) and full mode builds
    from init_from. The same seed on every rank: all ranks must build identical initial weights.
    """
    torch.manual_seed(cfg["seed"])
    if model_config is not None:
        model = model_from_config_file(model_config)
        if not cfg["bias"]:
            remove_biases(model)  # the same trainable parameters as the saved run, hence the same optimizer groups
    elif plan.mode in ADAPTER_MODES:
        model = build_base(cfg, vocab_size, plan.mode, plan.dtype, device_type, run_dir=run_dir)
    else:
        model = build_model(cfg, vocab_size)
    if plan.gradient_checkpointing:
        enable_checkpointing(model)  # before the adapters wrap it
    return LMWithLoss(apply_mode(model, plan, cfg), packed=packed_kernel(device_type, cfg["dropout"]))


def build_engine(run, module, plan, universal=False):
    """The DeepSpeed engine of a plan for this run (and the test-only fault hooks when their variables are set)."""
    engine, ds_config = create_engine(module, run.cfg, plan, run.world, run.hw.device_type == "cuda",
                                      load_universal=universal)
    faults.install(engine, run)
    return engine, ds_config


# ----------------------------------------------------------------------------- several nodes
# Every rank must see the same out_dir and the same data; each check below is collective, so a
# problem seen on one node only is raised on every rank (rank 0 prints it) instead of one rank
# failing while the others wait in a collective.

SHARED_MARKER = ".shared-check-"


def _sees_marker(marker, token, wait_s=2.0):
    """Whether this rank reads rank 0's token back (a short wait for a network filesystem's caches)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return marker.read_text() == token
        except OSError:
            if time.time() > deadline:
                return False
        time.sleep(0.2)


def check_shared_out_dir(out_dir, rank, world):
    """Several ranks: every rank must see the out_dir rank 0 writes (resuming needs every rank's part).

    Rank 0 writes a marker named by a random token into out_dir; after a barrier each rank reads it
    back and one all-gather compares what every rank saw. The marker is the only thing written before
    the inputs are checked: rank 0 removes it, and the folders it created to hold it, whatever the
    outcome (claim_out_dir creates out_dir for good once every input is known good).
    """
    if world == 1:
        return
    token = all_gather_objects(secrets.token_hex(16))[0]  # rank 0's token, on every rank
    marker = out_dir / f"{SHARED_MARKER}{token}"
    created, error = [], None
    if rank == 0:
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        except OSError as exc:
            error = (f"cannot write into out_dir {out_dir} ({exc.strerror or exc}); "
                     f"choose an --out_dir every node can write")
    barrier()
    views = all_gather_objects((node_name(), error, error is None and _sees_marker(marker, token)))
    if rank == 0:
        marker.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
    if views[0][1] is not None:  # rank 0 could not write the marker
        raise UserError(views[0][1])
    blind = [node for node, _, seen in views if not seen]
    if blind:
        raise UserError(f"out_dir {out_dir} is not shared between nodes: {blind[0]} does not see the file rank 0 "
                        f"wrote there, so no node could resume the checkpoints; put out_dir on a filesystem every "
                        f"node mounts at the same path (NFS, Lustre, ...)")


def on_every_rank(check, *args):
    """check(*args) on every rank; a UserError on any rank is raised on all of them (rank 0 prints it).

    The same mistake on every rank keeps its own line; a failure on some nodes only (a dataset missing
    on one node) is named with the node.
    """
    try:
        result, error = check(*args), None
    except UserError as exc:
        result, error = None, str(exc)
    seen = all_gather_objects((node_name(), error))
    failed = [(node, message) for node, message in seen if message is not None]
    if not failed:
        return result
    if len(failed) == len(seen):
        raise UserError(error)
    node, message = failed[0]
    raise UserError(f"on {node} only: {message} (every node must see the same files: prepare the data on every "
                    f"node or put data_dir on a filesystem every node shares)")


def data_signature(data):
    """What must be equal on every node: each dataset's name, vocabulary and token counts."""
    return [(p.names[0], p.vocab_size, len(p.tokens["train"]), len(p.tokens["val"]))
            for p in getattr(data, "parts", [data])]


def check_same_data(data):
    seen = all_gather_objects((node_name(), data_signature(data)))
    for node, signature in seen[1:]:
        if signature != seen[0][1]:
            def show(sig):
                return "; ".join(f"{n}: vocab {v}, {t:,} train and {w:,} val tokens" for n, v, t, w in sig)
            raise UserError(f"the dataset differs between nodes ({seen[0][0]} has {show(seen[0][1])}, {node} has "
                            f"{show(signature)}); prepare it once and copy it to every node, or put data_dir on a "
                            f"filesystem every node shares")


def same_hardware(hw):
    """The plan must be the same on every rank: plan for the smallest memory any rank reports."""
    seen = all_gather_objects((hw.bytes_per_device, hw.bf16))
    return replace(hw, bytes_per_device=min(b for b, _ in seen), bf16=all(bf16 for _, bf16 in seen))


# ----------------------------------------------------------------------------- the run

def claim_out_dir(cfg, rank):
    """Once every input is known good: clear a run being overwritten, create out_dir."""
    out_dir = Path(cfg["out_dir"])
    if rank == 0:
        if cfg["init_from"] != "resume" and cfg["overwrite"]:
            shutil.rmtree(checkpoint.checkpoint_dir(out_dir), ignore_errors=True)
            for events in out_dir.glob("events.out.tfevents.*"):
                events.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()


def write_run_files(run, model_config):
    (run.out_dir / "config.json").write_text(json.dumps(run.cfg, indent=2))
    model_config.to_json_file(run.out_dir / "model_config.json")
    (run.out_dir / "plan.json").write_text(json.dumps(run.plan_dict, indent=2))
    with open(run.out_dir / "meta.pkl", "wb") as f:
        pickle.dump(run.data.meta, f)


def build_run(cfg, hardware=None):
    """The whole setup of a training run (see the module docstring); returns the Run."""
    rank, world = rank_and_world()
    check_shared_out_dir(Path(cfg["out_dir"]), rank, world)  # its marker is the only write before the checks
    out_dir = check_out_dir(cfg)
    cfg, data, resume, notes = on_every_rank(final_config, cfg, out_dir, world)  # each rank opens its own data
    check_same_data(data)

    saved_model = out_dir / "model_config.json" if resume else None
    # the model's shape, and whether batches are packed instruction blocks: what the planner plans for
    shape = {**planner.run_shape(cfg, data.vocab_size, saved_model), "packed": bool(data.packed)}
    hw = same_hardware(planner.detect_hardware(world, **(hardware or {})))
    plan = planner.make_plan({**cfg, **shape}, hw)
    if may_offload(plan, cfg, hw):
        ensure_cpu_adam()  # built now, not hours in when a step-down first offloads

    full_resume = resume is not None and plan.mode not in ADAPTER_MODES  # adapter runs rebuild their base
    module = build_module(cfg, plan, data.vocab_size, hw.device_type, saved_model if full_resume else None,
                          run_dir=out_dir if resume else None)
    data.check_vocab(module.lm.config.vocab_size)
    if cfg["wandb_log"]:
        require_wandb()

    # Every input checked: only now is anything written.
    claim_out_dir(cfg, rank)
    wandb_run = {"project": cfg["wandb_project"], "name": cfg["wandb_run_name"], "config": cfg} \
        if cfg["wandb_log"] else None
    log = RunLogger(out_dir, rank == 0, cfg["tensorboard"], cfg["max_iters"], 0, wandb_run)
    log.print(planner.format_plan(plan))
    for line in notes:
        log.print(line)
    total, trainable = count_parameters(module)
    log.print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)")

    run = Run(cfg=cfg, out_dir=out_dir, rank=rank, world=world, data=data, shape=shape, hw=hw, plan=plan,
              engine=None, ds_config={}, sampler=TrainSampler(data, cfg["seed"]), log=log,
              tokenizer=load_tokenizer(data.meta), n_params=total,
              n_trainable=trainable)
    run.engine, run.ds_config = build_engine(run, module, plan, universal=bool(resume and resume.universal))
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs by rank, as in nanoGPT

    if resume is not None:
        load_resume_state(run, resume)
    if run.master:
        write_run_files(run, module.lm.config)
    log.json_text("config", cfg)
    log.json_text("plan", run.plan_dict)
    log.json_text("deepspeed_config", run.ds_config)
    if log.bar is not None:
        log.bar.reset(total=cfg["max_iters"])
        log.bar.update(run.iter_num)
    log.print(f"tokens per iteration: {run.tokens_per_iter:,} ({run.sequences} sequences of {cfg['block_size']}; "
              f"micro-batch {plan.micro_batch_size} x {plan.grad_accum_per_rank} accumulation x {world} ranks)")
    return run


def load_resume_state(run, resume):
    """Weights, optimizer, iteration, best val loss and the data sampler's position from the checkpoint."""
    if resume.universal:
        run.log.print("the checkpoint was saved on another number of ranks: converting it to DeepSpeed's "
                      "universal format")
        checkpoint.to_universal(run.out_dir, resume.tag)
    state = checkpoint.load(run.engine, run.out_dir, resume.tag, run.adapters_only, resume.universal)
    run.iter_num = run.start_iter = state["iter_num"]
    run.best_val_loss = state["best_val_loss"]
    run.evals_without_improvement = state.get("evals_without_improvement", 0)  # absent from older checkpoints
    run.sampler.load_state_dict(state["sampler"])
    run.log.print(f"resumed from iteration {run.iter_num} (best val loss {run.best_val_loss:.4f})")
