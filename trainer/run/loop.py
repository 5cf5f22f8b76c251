"""The one training loop, for pretraining and finetuning alike (nanoGPT's train.py on DeepSpeed).

train(cfg): the setup (trainer/run/setup.py) builds the run; then, each iteration: set the learning
rate, evaluate and save when due, one iteration of micro-steps (engine(x, y) -> engine.backward
-> engine.step), the non-finite guard, logging, and a clean stop on SIGINT/SIGTERM.
"""
import math
import time

import numpy as np
import torch

from trainer.data.mixing import shares_line
from trainer.data.tokenizer import IGNORE_INDEX
from trainer.errors import UserError
from trainer.metrics import answer_metrics
from trainer.model.generate import answer_budget, generate_answers
from trainer.model.loss import token_weighted
from trainer.model.sampling import generate
from trainer.optim.release import NonFiniteGradient
from trainer.optim.schedule import lr_at
from trainer.plan.hardware import peak_flops
from trainer.run import checkpoint, checkpoint_save, oom
from trainer.run.engine import clip_or_skip, set_lr
from trainer.run.interrupts import StopRequest
from trainer.run.logger import format_eta, peak_memory_bytes, reset_peak_memory
from trainer.run.ranks import agree_any, all_reduce_sum
from trainer.run.setup import build_run, report_startup
from trainer.startup import CLOCK
from trainer.units import format_bytes


def train(cfg, hardware=None):
    stop = StopRequest().install()  # from the start: the setup stops at its next stage (run/interrupts.py)
    run = build_run(cfg, hardware)
    try:  # the log is closed on every way out (the guard's stop, an out-of-memory error): its last events flushed
        stop.in_loop = True
        return loop(run, stop)
    finally:
        stop.uninstall()
        run.log.close()


def loop(run, stop):
    cfg = run.cfg  # the final config: on resume the run's own model keys, max_epochs as iterations
    recovery = oom.Recovery(run)
    guard = NonFiniteGuard(run)
    timer = Timer()
    while True:
        lr = lr_at(run.iter_num, cfg)
        set_lr(run.engine, lr)

        if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters or cfg.eval_only:
            evaluate_and_save(run, guard)
            CLOCK.mark("evaluation at the start")  # (only until the first iteration)
            timer.restart()  # evaluation time is not training time
            if stops_early(run):
                break
        if cfg.eval_only or run.iter_num >= cfg.max_iters:
            break

        if not CLOCK.done:
            report_startup(run)
        try:
            loss, grad_norm = train_iteration(run, recovery)
        except NonFiniteGradient as exc:  # part of the step is applied: it cannot be skipped
            run.iter_num += 1
            guard.stop_for_weights("in its backward", f"a non-finite gradient of {exc} (the tensors before it "
                                   f"already stepped)")
        run.iter_num += 1
        timer.tick()
        run.log.advance()

        # One small all-reduce: every rank stops, or skips a non-finite step, at the same iteration. A step taken
        # (its loss and gradients finite) that made a weight non-finite stops the run before anything uses them.
        bad = not math.isfinite(loss + (grad_norm or 0.0))
        stop_requested, bad, broken = agree_any([stop.requested, bad, not bad and not weights_finite(run)], run.device)
        if broken:
            guard.stop_for_weights("after its step")
        guard.update(bad)
        if run.iter_num % cfg.log_interval == 0:
            log_progress(run, loss, grad_norm, lr, timer)
        if stop_requested:  # SIGINT/SIGTERM: save this iteration and leave cleanly
            stop.saving = True
            path, size = save(run, guard)
            run.log.print(f"interrupted: saved checkpoint {path} ({format_bytes(size, sep='')}) at iteration "
                          f"{run.iter_num}; resume with the same command and --init_from=resume")
            break
    return {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss}


def train_iteration(run, recovery):
    """One optimizer step over this rank's micro-batches; (this rank's loss, whose mean over the ranks is the
    iteration's mean token loss; grad norm or None).

    Out of memory: the plan steps down (trainer/run/oom.py) and the iteration is redone on the same windows.
    """
    sampler_state = run.sampler.state_dict()
    while True:
        try:
            return micro_steps(run)
        except torch.OutOfMemoryError as exc:
            error = oom.describe(exc)  # let go of the traceback and graph holding the activations
        if run.engine.gradient_release is not None:  # some tensors may have stepped: the iteration cannot be redone
            raise UserError(f"out of memory with optimizer_in_backward=True ({error}); the iteration's step may be "
                            f"partly applied, so it cannot be redone smaller; lower --batch_size or set "
                            f"--optimizer_in_backward=False, then continue with --init_from=resume")
        recovery.step_down(error)
        run.sampler.load_state_dict(sampler_state)


def micro_steps(run):
    """The micro-steps of one iteration; one host sync at its end (the losses and the grad norm together).

    Token-weighted: each micro-batch's mean loss is weighted by its share of the iteration's loss tokens
    (trainer/model/loss.token_weight), so the update, and the loss returned (summed over the ranks by
    log_progress), are the mean over every loss token of the iteration, whatever the micro-batch,
    accumulation or number of ranks (an out-of-memory step-down included: the weights use the plan of
    the try that runs).
    """
    engine, device = run.engine, run.device
    accum = engine.gradient_accumulation_steps()  # what engine.backward divides each loss by
    loss_sum, grad_norm = None, None
    release = engine.gradient_release  # the step inside the backward (trainer/optim/release.py), or None
    batches, loss_tokens = run.sampler.iteration(run.sequences, run.rank, run.world, run.plan.micro_batch_size)
    for x, y, *pos in batches:
        loss = engine(*[to_device(t, device) for t in (x, y, *pos)])  # pos: packed data's positions
        loss = token_weighted(loss, int((y != IGNORE_INDEX).sum()), loss_tokens, accum * run.world)
        if release is None or release.finite(loss):
            engine.backward(loss)
        if run.clips_by_hand and release is None and engine.is_gradient_accumulation_boundary():
            grad_norm = clip_or_skip(engine, run.cfg.grad_clip)
        engine.step()  # AdamW (and clipping, ZeRO's reductions) at the accumulation boundary
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()  # stays on the device
    if release is not None:
        grad_norm = release.take_norm()
    elif not run.clips_by_hand:
        grad_norm = engine.get_global_grad_norm()  # DeepSpeed skips non-finite steps itself
    if isinstance(grad_norm, torch.Tensor):  # the loss sum and the norm cross to the host in one copy
        loss_total, grad_norm = torch.stack([loss_sum.float(), grad_norm.to(loss_sum.device).float()]).tolist()
    else:
        loss_total = loss_sum.item()
    return loss_total / accum, grad_norm


def to_device(t, device):
    """A batch tensor on the device; on a GPU copied from pinned memory without waiting for the copy."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def evaluate_and_save(run, guard):
    """Losses on the fixed evaluation windows, a TensorBoard sample, and a checkpoint when val improves.
    Non-finite losses stop the run (the guard) before a sample or a save uses the weights."""
    cfg = run.cfg
    losses = estimate_loss(run)
    run.log.print(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    run.log.scalar("eval/train_loss", losses["train"], run.iter_num)
    run.log.scalar("eval/val_loss", losses["val"], run.iter_num)
    if not all(map(math.isfinite, losses.values())):  # the same on every rank: the losses are all-reduced
        guard.stop_for_weights("at its evaluation", f"non-finite losses (train {losses['train']}, val {losses['val']})")
    if (cfg.tensorboard or cfg.wandb_log) and cfg.sample_max_new_tokens > 0:
        run.log.text("sample", sample_text(run), run.iter_num)
    if cfg.eval_generate:
        log_answers(run)
    improved = losses["val"] < run.best_val_loss
    if run.iter_num > run.start_iter:  # the state a run starts from was counted before it was saved
        run.evals_without_improvement = 0 if improved else run.evals_without_improvement + 1
    if improved or cfg.always_save_checkpoint:
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        if run.iter_num > run.start_iter and not cfg.eval_only:  # nothing new to save at the start
            path, size = save(run, guard)
            run.log.print(f"saved checkpoint {path} ({format_bytes(size, sep='')})")


def stops_early(run):
    """early_stop=N: N evaluations in a row without a new best val loss end the run (its best checkpoint kept)."""
    patience = run.cfg.early_stop
    if not patience or run.evals_without_improvement < patience:
        return False
    best = checkpoint.latest_tag(run.out_dir)  # always_save_checkpoint=False: only improvements were saved
    run.log.print(f"early stop at iteration {run.iter_num}: no better val loss than {run.best_val_loss:.4f} in "
                  f"{patience} evaluations; the best checkpoint, {best or 'none (nothing trained yet)'}, is kept")
    return True


def save(run, guard):
    """A checkpoint of this iteration; never of non-finite weights (the guard stops the run instead)."""
    if agree_any([not weights_finite(run)], run.device)[0]:
        guard.stop_for_weights("before its save")
    return checkpoint_save.save(run.engine, run.out_dir, run.iter_num, run.client_state(), run.adapters_only)


@torch.no_grad()
def estimate_loss(run):
    """Mean token loss over the fixed evaluation windows of each split, shared out by rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively);
    a rank with no window left repeats one with weight 0.
    """
    engine, data, device, cfg = run.engine, run.data, run.device, run.cfg
    micro = run.plan.micro_batch_size
    engine.eval()
    out = {}
    for split in ("train", "val"):
        offsets = data.eval_offsets(split, cfg.eval_iters * cfg.batch_size, cfg.seed)
        batches = [offsets[i:i + micro] for i in range(0, len(offsets), micro)]
        loss_sum = count = 0.0
        for r in range(math.ceil(len(batches) / run.world)):
            b = r * run.world + run.rank
            weight = 1.0 if b < len(batches) else 0.0
            x, y, *pos = data.windows(split, batches[min(b, len(batches) - 1)])
            loss = engine(x.to(device), y.to(device), *[p.to(device) for p in pos])
            n = float((y != IGNORE_INDEX).sum())
            loss_sum += weight * loss.item() * n
            count += weight * n
        loss_sum, count = all_reduce_sum([loss_sum, count], device)
        out[split] = loss_sum / max(count, 1.0)
    engine.train()
    return out


def sample_text(run):
    """A short sample for TensorBoard (run on every rank: ZeRO-3 forward passes are collective)."""
    lm, cfg, device = run.engine.module.lm, run.cfg, run.device
    lm.eval()
    start = run.tokenizer.encode(cfg.sample_start) or [0]
    idx = torch.tensor([start], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(lm, idx, cfg.sample_max_new_tokens, cfg.block_size, temperature=0.8, top_k=200,
                   vocab_limit=run.data.vocab_size, generator=gen)
    lm.train()
    return run.tokenizer.decode(out[0].tolist())


def log_answers(run, shown=3):
    """eval_generate=N: greedy answers to N fixed val examples (a seeded choice), scored against their
    references (trainer/metrics.py); the scores and the first `shown` answers go to the console and TensorBoard.

    Every rank answers the same examples and stops each batch at the same step (ZeRO-3 forward passes are
    collective); rank 0 scores and logs.
    """
    examples = run.data.examples("val")
    if not examples:
        return
    chosen = np.random.default_rng(run.cfg.seed).permutation(len(examples))[:run.cfg.eval_generate]
    prompts, references = [examples[i][0] for i in chosen], [examples[i][1] for i in chosen]
    lm, eot = run.engine.module.lm, run.tokenizer.eot_token
    all_done = None if run.world == 1 else (lambda done: not agree_any([not bool(done.all())], run.device)[0])
    lm.eval()
    answers = generate_answers(lm, prompts, run.cfg.block_size, answer_budget(map(len, references)), eot,
                               batch_size=run.plan.micro_batch_size, vocab_limit=run.data.vocab_size,
                               all_done=all_done)
    lm.train()
    if not run.master:
        return
    decode = run.tokenizer.decode
    predictions, references = [decode(a) for a in answers], [decode(r) for r in references]
    scores = answer_metrics(predictions, references)
    run.log.print(f"step {run.iter_num}: {len(answers)} val answers: exact match {scores['exact_match']:.4f}, "
                  f"ROUGE-L {scores['rougeL']:.4f}, BLEU {scores['bleu']:.2f}")
    for name, value in scores.items():
        run.log.scalar(f"eval/{name}", value, run.iter_num)
    run.log.text("answers", "\n\n".join(
        f"### prompt (its end)\n{decode(prompts[i])[-300:]}\n### answer\n{predictions[i]}\n### reference\n"
        f"{references[i]}" for i in range(min(shown, len(answers)))), run.iter_num)


def log_progress(run, loss, grad_norm, lr, timer):
    """The periodic line (loss, lr, speed, memory, MFU, ETA) and its TensorBoard scalars."""
    it, max_iters = run.iter_num, run.cfg.max_iters
    (loss_total,) = all_reduce_sum([loss], run.device)
    train_loss = loss_total / run.world
    seconds = timer.per_iteration()
    tokens_per_sec = run.tokens_per_iter / seconds
    grad_norm = float(grad_norm) if grad_norm is not None else None
    allocated, reserved = peak_memory_bytes()  # GPU: the peaks of this interval
    reset_peak_memory()
    flops, why = peak_flops()
    if run.plan.dtype == "fp32" and flops:
        flops, why = None, "no MFU for fp32 training (the peak table is of 16-bit tensor cores)"
    if flops is None:
        run.log.print_once("mfu", why)
    mfu = run.flops_per_token * tokens_per_sec / (flops * run.world) if flops else None
    memory = f"mem {format_bytes(allocated, sep='')}"
    if reserved:
        memory += f" (reserved {format_bytes(reserved, sep='')})"
    line = (f"iter {it}/{max_iters}: loss {train_loss:.4f}, lr {lr:.2e}, {1000 * seconds:.1f}ms/iter, "
            f"{tokens_per_sec:,.0f} tok/s, {memory}")
    line += f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
    run.log.print(line + f", eta {format_eta((max_iters - it) * seconds)}")
    for tag, value in (("train/loss", train_loss), ("train/lr", lr), ("train/grad_norm", grad_norm),
                       ("perf/tokens_per_sec", tokens_per_sec), ("perf/mfu", mfu), ("mem/peak_bytes", allocated),
                       ("mem/peak_reserved_bytes", reserved)):
        run.log.scalar(tag, value, it)
    if run.plan.dtype == "fp16":
        run.log.scalar("train/loss_scale", getattr(run.engine.optimizer, "cur_scale", None), it)
    if len(run.data.names) > 1:  # a mixture: the realised share of each dataset so far
        run.log.print(shares_line(run.sampler))
        for name, share in run.sampler.shares().items():
            run.log.scalar(f"data/share/{name}", share, it)
    timer.restart()


class Timer:
    """Wall time per training iteration since the last restart (evaluations excluded)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.iterations = time.time(), 0

    def tick(self):
        self.iterations += 1

    def per_iteration(self):
        return (time.time() - self.start) / max(1, self.iterations)


def weights_finite(run):
    """Every trainable weight this rank holds is finite (under ZeRO-3 its partition: the module's own parameters
    are empty placeholders). One pass over the weights and one host sync."""
    held = [getattr(p, "ds_tensor", p) for p in run.engine.module.parameters() if p.requires_grad]
    held = [t for t in held if t.numel()]
    return not held or bool(torch.stack([torch.isfinite(t).all() for t in held]).all())


class NonFiniteGuard:
    """A non-finite loss or gradient norm means the step was skipped; too many in a row end the run. Non-finite
    weights (a finite step that blew them up, seen after the step, at an evaluation or before a save) end it at
    once: nothing is saved or sampled from them."""

    def __init__(self, run):
        self.run, self.in_a_row, self.skipped = run, 0, 0

    def stop_for_weights(self, where, what="non-finite weights"):
        run = self.run
        last = checkpoint.latest_tag(run.out_dir)
        raise UserError(f"{what} at iteration {run.iter_num}, found {where}: the run diverged; stopped without "
                        f"saving (last good checkpoint: {last or 'none'}); lower --learning_rate (or raise "
                        f"--warmup_iters), then continue with --init_from=resume")

    def update(self, bad):
        run = self.run
        self.in_a_row = self.in_a_row + 1 if bad else 0
        if not bad:
            return
        self.skipped += 1
        run.log.print(f"iter {run.iter_num}: non-finite loss or gradient norm, step skipped "
                      f"({self.in_a_row} in a row, {self.skipped} in all)")
        run.log.scalar("train/skipped_steps", self.skipped, run.iter_num)
        if self.in_a_row >= run.cfg.max_bad_steps:
            last = checkpoint.latest_tag(run.out_dir)
            raise UserError(f"{self.in_a_row} non-finite steps in a row up to iteration {run.iter_num}; stopped "
                            f"without saving (last good checkpoint: {last or 'none'}); lower --learning_rate "
                            f"or check the data, then continue with --init_from=resume")
