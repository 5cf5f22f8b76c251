"""The one training loop, for pretraining and finetuning alike (nanoGPT's train.py on DeepSpeed).

train(cfg): data -> plan -> model (+ adapters) -> DeepSpeed engine -> iterations with
evaluation, checkpoints, console, TensorBoard.
"""
import json
import math
import pickle
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint, oom, planner
from trainer.adapters import apply_mode, build_base, uses_adapters
from trainer.data import TrainSampler, eval_offsets
from trainer.mixing import epochs_to_iters, open_data, shares_line
from trainer.engine import clip_or_skip, clips_by_hand, create_engine, lr_at, set_lr
from trainer.config import DEFAULTS
from trainer.errors import UserError
from trainer.faults import maybe_poison
from trainer.interrupts import StopRequest
from trainer.model import (LMWithLoss, build_model, count_parameters, model_from_config_file, model_shape,
                           remove_biases)
from trainer.run_logger import (RunLogger, flops_per_token, format_eta, human_bytes, peak_flops,
                                peak_memory_bytes)
from trainer.sampling import generate
from trainer.tokenizer import load_tokenizer

RUN_FILES = ("config.json", "model_config.json", "plan.json", "meta.pkl")


def rank_and_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree_any(flags, device):
    """Each flag true on every rank when it is true on any (one all-reduce per iteration)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def all_reduce_sum(values, device):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def check_out_dir(cfg):
    """A fresh run refuses an out_dir holding another run, unless overwrite=True (nothing is touched yet)."""
    out_dir = Path(cfg["out_dir"])
    taken = (out_dir / "config.json").exists() or checkpoint.checkpoint_dir(out_dir).exists()
    if cfg["init_from"] != "resume" and taken and not cfg["overwrite"]:
        raise UserError(f"out_dir {out_dir} already holds a run; resume it with --init_from=resume, "
                        f"choose another --out_dir, or pass --overwrite=True to replace it")
    return out_dir


def claim_out_dir(cfg, rank):
    """Once every input is known good: clear a run being overwritten, create out_dir."""
    out_dir = Path(cfg["out_dir"])
    if rank == 0:
        if cfg["init_from"] != "resume" and cfg["overwrite"]:
            shutil.rmtree(checkpoint.checkpoint_dir(out_dir), ignore_errors=True)
            for events in out_dir.glob("events.out.tfevents.*"):
                events.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()


def resume_config(cfg, out_dir):
    """On resume the model's shape and source come from the run; training keys from the command."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise UserError(f"init_from='resume' but {path} does not exist; start a new run without --init_from=resume")
    saved = json.loads(path.read_text())
    merged = dict(cfg)
    for key in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset", "mode", "lora_r",
                "lora_alpha", "lora_targets"):
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
    universal = saved >= 1 and (world != info["world_size"] or wanted != saved)
    if wanted != saved and (saved == 0 or wanted == 0):
        raise UserError(f"cannot resume a ZeRO-{saved} checkpoint with zero_stage={wanted}; "
                        f"resume with --zero_stage={saved}")
    return cfg, universal


@torch.no_grad()
def estimate_loss(engine, data, cfg, micro, rank, world, device):
    """Mean token loss over the fixed evaluation windows of each split, shared out by rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
    a rank with no window left repeats one with weight 0.
    """
    engine.eval()
    out = {}
    for split in ("train", "val"):
        offsets = eval_offsets(data, split, cfg["eval_iters"] * cfg["batch_size"], cfg["seed"])
        batches = [offsets[i:i + micro] for i in range(0, len(offsets), micro)]
        rounds = math.ceil(len(batches) / world)
        loss_sum = count = 0.0
        for r in range(rounds):
            b = r * world + rank
            weight = 1.0 if b < len(batches) else 0.0
            x, y, *pos = data.windows(split, batches[min(b, len(batches) - 1)])  # pos: packed data's positions
            loss = engine(x.to(device), y.to(device), *[p.to(device) for p in pos])
            n = float((y != -100).sum())
            loss_sum += weight * loss.item() * n
            count += weight * n
        loss_sum, count = all_reduce_sum([loss_sum, count], device)
        out[split] = loss_sum / max(count, 1.0)
    engine.train()
    return out


def sample_text(engine, tokenizer, cfg, vocab_limit, device):
    """A short sample for TensorBoard (run on every rank: ZeRO-3 forward passes are collective)."""
    lm = engine.module.lm
    lm.eval()
    start = tokenizer.encode(cfg["sample_start"]) or [0]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    out = generate(lm, idx, cfg["sample_max_new_tokens"], cfg["block_size"], temperature=0.8, top_k=200,
                   vocab_limit=vocab_limit, generator=gen)
    lm.train()
    return tokenizer.decode(out[0].tolist())


def write_run_files(out_dir, cfg, model, plan_dict, meta):
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    model.config.to_json_file(out_dir / "model_config.json")
    (out_dir / "plan.json").write_text(json.dumps(plan_dict, indent=2))
    with open(out_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def train(cfg, hardware_overrides=None):
    rank, world = rank_and_world()
    master = rank == 0
    out_dir = check_out_dir(cfg)
    resuming = cfg["init_from"] == "resume"
    universal = False
    if resuming:
        cfg = resume_config(cfg, out_dir)
        resume_tag = checkpoint.choose_tag(out_dir, cfg["resume_tag"])
        cfg, universal = resume_layout(cfg, checkpoint.read_info(out_dir, resume_tag), world)

    data = open_data(cfg)  # one dataset, or a MixedData for a list of them
    if cfg["max_epochs"] > 0:
        cfg, epochs_line = epochs_to_iters(cfg, data)
    shape = model_shape(cfg, data.vocab_size, out_dir / "model_config.json" if resuming else None)
    hw = planner.detect_hardware(world, **(hardware_overrides or {}))
    plan = planner.make_plan({**cfg, **shape}, hw)
    plan_dict = planner.plan_to_dict(plan)

    # The same seed on every rank: all ranks must build identical initial weights.
    torch.manual_seed(cfg["seed"])
    if uses_adapters(plan):  # the frozen base comes from init_from (the run's original on resume), never from
        model = build_base(cfg, data.vocab_size, plan.mode, plan.dtype, hw.device_type)  # adapter checkpoints
    else:
        model = model_from_config_file(out_dir / "model_config.json") if resuming else build_model(cfg, data.vocab_size)
        if resuming and not cfg["bias"]:
            remove_biases(model)  # the same trainable parameters as the saved run, hence the same optimizer groups
    data.check_vocab(model.config.vocab_size)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_mode(model, plan, cfg)

    # Every input checked: only now is anything written.
    claim_out_dir(cfg, rank)
    log = RunLogger(out_dir, master, cfg["tensorboard"], cfg["max_iters"], 0)
    log.print(planner.format_plan(plan))
    if cfg["max_epochs"] > 0:
        log.print(epochs_line)
    if len(data.names) > 1:
        log.print(f"mixing datasets ({cfg['mix']}): {data.describe()}")
    total, trainable = count_parameters(model)
    log.print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)")

    on_gpu = hw.device_type == "cuda"
    engine, ds_config = create_engine(LMWithLoss(model), cfg, plan, world, on_gpu, load_universal=universal)
    device = engine.device
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs by rank, as in nanoGPT
    sampler = TrainSampler(data, cfg["seed"])
    adapters_only = uses_adapters(plan)

    iter_num, best_val_loss = 0, float("inf")
    if resuming:
        if universal:
            log.print(f"the checkpoint was saved on another number of ranks: converting it to DeepSpeed's "
                      f"universal format")
            checkpoint.to_universal(out_dir, resume_tag)
        state = checkpoint.load(engine, out_dir, resume_tag, adapters_only, universal)
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        sampler.load_state_dict(state["sampler"])
        log.print(f"resumed from iteration {iter_num} (best val loss {best_val_loss:.4f})")
    start_iter = iter_num
    if master:
        write_run_files(out_dir, cfg, model, plan_dict, data.meta)
    log.json_text("config", cfg)
    log.json_text("plan", plan_dict)
    log.json_text("deepspeed_config", ds_config)
    if log.bar is not None:
        log.bar.reset(total=cfg["max_iters"])
        log.bar.update(iter_num)

    tokenizer = load_tokenizer(data.meta)
    sequences = cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    tokens_per_iter = sequences * cfg["block_size"]
    flops_token = flops_per_token(total, shape["n_layer"], shape["n_head"], shape["n_embd"], cfg["block_size"])
    log.print(f"tokens per iteration: {tokens_per_iter:,} ({sequences} sequences of {cfg['block_size']}; "
              f"micro-batch {plan.micro_batch_size} x {plan.grad_accum_per_rank} accumulation x {world} ranks)")

    def client_state():
        return {"iter_num": iter_num, "best_val_loss": best_val_loss, "config": cfg, "plan": plan_dict,
                "sampler": sampler.state_dict()}

    by_hand = clips_by_hand(plan)
    recovery = oom.Recovery(cfg, hw, shape, data.vocab_size, out_dir, log, master, world)
    stop = StopRequest().install()
    bad_in_a_row = skipped = 0
    t_last, iters_since_log = time.time(), 0
    while True:
        lr = lr_at(iter_num, cfg)
        set_lr(engine, lr)

        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"] or cfg["eval_only"]:
            losses = estimate_loss(engine, data, cfg, plan.micro_batch_size, rank, world, device)
            log.print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log.scalar("eval/train_loss", losses["train"], iter_num)
            log.scalar("eval/val_loss", losses["val"], iter_num)
            if cfg["tensorboard"] and cfg["sample_max_new_tokens"] > 0:
                log.text("sample", sample_text(engine, tokenizer, cfg, data.vocab_size, device), iter_num)
            if losses["val"] < best_val_loss or cfg["always_save_checkpoint"]:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > start_iter and not cfg["eval_only"]:  # nothing new to save at the start
                    path, size = checkpoint.save(engine, out_dir, iter_num, client_state(), adapters_only)
                    log.print(f"saved checkpoint {path} ({human_bytes(size)})")
            t_last, iters_since_log = time.time(), 0  # evaluation time is not training time
        if cfg["eval_only"] or iter_num >= cfg["max_iters"]:
            break

        sampler_state = sampler.state_dict()  # out of memory: the iteration is redone on the same windows
        while True:
            try:
                loss_sum, grad_norm = 0.0, None
                for x, y, *pos in sampler.iteration_batches(sequences, rank, world, plan.micro_batch_size):
                    oom.maybe_inject(iter_num, engine)
                    loss = maybe_poison(engine(x.to(device), y.to(device), *[p.to(device) for p in pos]), iter_num)
                    engine.backward(loss)
                    if by_hand and engine.is_gradient_accumulation_boundary():
                        grad_norm = clip_or_skip(engine, cfg["grad_clip"])
                    engine.step()
                    loss_sum += loss.item()
                break
            except torch.OutOfMemoryError as exc:
                error, loss = oom.describe(exc), None  # let go of the traceback and graph holding the activations
            engine, plan, plan_dict = recovery.step_down(error, engine, plan, iter_num)  # trainer/oom.py
            by_hand, adapters_only = clips_by_hand(plan), uses_adapters(plan)
            sampler.load_state_dict(sampler_state)
        if not by_hand:
            grad_norm = engine.get_global_grad_norm()  # DeepSpeed skips non-finite steps itself
        iter_num += 1
        iters_since_log += 1
        log.advance()

        # Non-finite loss or gradients: the step was skipped; too many in a row ends the run.
        stop_requested, bad = agree_any([stop.requested, not math.isfinite(loss_sum + (grad_norm or 0.0))], device)
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad:
            skipped += 1
            log.print(f"iter {iter_num}: non-finite loss or gradient norm, step skipped "
                      f"({bad_in_a_row} in a row, {skipped} in all)")
            log.scalar("train/skipped_steps", skipped, iter_num)
            if bad_in_a_row >= cfg["max_bad_steps"]:
                last = checkpoint.latest_tag(out_dir)
                raise UserError(f"{bad_in_a_row} non-finite steps in a row up to iteration {iter_num}; stopped "
                                f"without saving (last good checkpoint: {last or 'none'}); lower --learning_rate "
                                f"or check the data, then continue with --init_from=resume")
        if plan.dtype == "fp16":
            log.scalar("train/loss_scale", getattr(engine.optimizer, "cur_scale", None), iter_num)

        if iter_num % cfg["log_interval"] == 0:
            (loss_total,) = all_reduce_sum([loss_sum / plan.grad_accum_per_rank], device)
            train_loss = loss_total / world
            elapsed = time.time() - t_last
            ms_per_iter = 1000 * elapsed / iters_since_log
            tokens_per_sec = tokens_per_iter * iters_since_log / elapsed
            grad_norm = float(grad_norm) if grad_norm is not None else None
            peak = peak_memory_bytes()
            flops = peak_flops()
            mfu = flops_token * tokens_per_sec / (flops * world) if flops else None
            line = (f"iter {iter_num}/{cfg['max_iters']}: loss {train_loss:.4f}, lr {lr:.2e}, "
                    f"{ms_per_iter:.1f}ms/iter, {tokens_per_sec:,.0f} tok/s, mem {human_bytes(peak)}")
            line += f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
            log.print(line + f", eta {format_eta((cfg['max_iters'] - iter_num) * ms_per_iter / 1000)}")
            log.scalar("train/loss", train_loss, iter_num)
            log.scalar("train/lr", lr, iter_num)
            log.scalar("train/grad_norm", grad_norm, iter_num)
            log.scalar("perf/tokens_per_sec", tokens_per_sec, iter_num)
            log.scalar("perf/mfu", mfu, iter_num)
            log.scalar("mem/peak_bytes", peak, iter_num)
            if len(data.names) > 1:  # a mixture: the realised share of each dataset so far
                log.print(shares_line(sampler))
                for name, share in sampler.shares().items():
                    log.scalar(f"data/share/{name}", share, iter_num)
            t_last, iters_since_log = time.time(), 0

        if stop_requested:  # SIGINT/SIGTERM: save this iteration and leave cleanly
            stop.saving = True
            path, size = checkpoint.save(engine, out_dir, iter_num, client_state(), adapters_only)
            log.print(f"interrupted: saved checkpoint {path} ({human_bytes(size)}) at iteration {iter_num}; "
                      f"resume with the same command and --init_from=resume")
            break

    stop.uninstall()
    log.close()
    return {"iter_num": iter_num, "best_val_loss": best_val_loss}
