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

from trainer import checkpoint, planner
from trainer.adapters import apply_mode, uses_adapters
from trainer.data import TokenData, TrainSampler, dataset_dir, eval_offsets
from trainer.engine import create_engine, grad_norm_before_step, lr_at, reports_grad_norm, set_lr
from trainer.errors import UserError
from trainer.model import LMWithLoss, build_model, count_parameters, model_from_config_file, model_shape
from trainer.run_logger import (RunLogger, flops_per_token, format_eta, human_bytes, peak_flops,
                                peak_memory_bytes)
from trainer.sampling import generate
from trainer.tokenizer import load_tokenizer

RUN_FILES = ("config.json", "model_config.json", "plan.json", "meta.pkl")


def rank_and_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values, device):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def prepare_out_dir(cfg, rank):
    """A fresh run refuses an out_dir holding another run, unless overwrite=True clears it."""
    out_dir = Path(cfg["out_dir"])
    taken = (out_dir / "config.json").exists() or checkpoint.checkpoint_dir(out_dir).exists()
    if cfg["init_from"] != "resume" and taken:
        if not cfg["overwrite"]:
            raise UserError(f"out_dir {out_dir} already holds a run; resume it with --init_from=resume, "
                            f"choose another --out_dir, or pass --overwrite=True to replace it")
        if rank == 0:
            shutil.rmtree(checkpoint.checkpoint_dir(out_dir), ignore_errors=True)
            for events in out_dir.glob("events.out.tfevents.*"):
                events.unlink()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def resume_config(cfg, out_dir):
    """On resume the model's shape and source come from the run; training keys from the command."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise UserError(f"init_from='resume' but {path} does not exist; start a new run without --init_from=resume")
    saved = json.loads(path.read_text())
    merged = dict(cfg)
    for key in ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset", "mode", "lora_r",
                "lora_alpha", "lora_targets"):
        merged[key] = saved[key]
    merged["init_from"] = saved["init_from"]
    merged["resumed_from"] = str(out_dir)
    return merged


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
            x, y = data.windows(split, batches[min(b, len(batches) - 1)])
            loss = engine(x.to(device), y.to(device))
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
    out_dir = prepare_out_dir(cfg, rank)
    resuming = cfg["init_from"] == "resume"
    if resuming:
        cfg = resume_config(cfg, out_dir)

    data = TokenData(dataset_dir(cfg), cfg["block_size"])
    shape = model_shape(cfg, data.vocab_size, out_dir / "model_config.json" if resuming else None)
    hw = planner.detect_hardware(world, **(hardware_overrides or {}))
    plan = planner.make_plan({**cfg, **shape}, hw)
    plan_dict = planner.plan_to_dict(plan)

    log = RunLogger(out_dir, master, cfg["tensorboard"], cfg["max_iters"], 0)
    log.print(planner.format_plan(plan))

    # The same seed on every rank: all ranks must build identical initial weights.
    torch.manual_seed(cfg["seed"])
    model = model_from_config_file(out_dir / "model_config.json") if resuming else build_model(cfg, data.vocab_size)
    data.check_vocab(model.config.vocab_size)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_mode(model, plan, cfg)
    total, trainable = count_parameters(model)
    log.print(f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)")

    on_gpu = hw.device_type == "cuda"
    engine, ds_config = create_engine(LMWithLoss(model), cfg, plan, world, on_gpu)
    device = engine.device
    torch.manual_seed(cfg["seed"] + rank)  # dropout differs by rank, as in nanoGPT
    sampler = TrainSampler(data, cfg["seed"])
    adapters_only = uses_adapters(plan)

    iter_num, best_val_loss = 0, float("inf")
    if resuming:
        state = checkpoint.load(engine, out_dir, adapters_only)
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        sampler.load_state_dict(state["sampler"])
        log.print(f"resumed from iteration {iter_num} (best val loss {best_val_loss:.4f})")
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

    ds_reports_norm = reports_grad_norm(engine)
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
                if iter_num > 0 and not cfg["eval_only"]:
                    path, size = checkpoint.save(engine, out_dir, iter_num, client_state(), adapters_only)
                    log.print(f"saved checkpoint {path} ({human_bytes(size)})")
            t_last, iters_since_log = time.time(), 0  # evaluation time is not training time
        if cfg["eval_only"] or iter_num >= cfg["max_iters"]:
            break

        loss_sum, grad_norm = 0.0, None
        for x, y in sampler.iteration_batches(sequences, rank, world, plan.micro_batch_size):
            loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            if not ds_reports_norm and engine.is_gradient_accumulation_boundary():
                grad_norm = grad_norm_before_step(engine)
            engine.step()
            loss_sum += loss.item()
        if ds_reports_norm:
            grad_norm = engine.get_global_grad_norm()
        iter_num += 1
        iters_since_log += 1
        log.advance()

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
            t_last, iters_since_log = time.time(), 0

    log.close()
    return {"iter_num": iter_num, "best_val_loss": best_val_loss}
