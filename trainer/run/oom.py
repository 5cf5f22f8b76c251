"""Out of memory during a step: step the plan down and redo the iteration, with nothing lost.

The loop catches torch.OutOfMemoryError around one iteration, lets go of the traceback (it holds
the activations), and calls Recovery.step_down. That asks trainer/plan/planner.step_down for the next
plan (its docstring holds the order: checkpointing on, activation offload on a GPU, a smaller
micro-batch with more accumulation, on several ranks a higher ZeRO stage, 8-bit optimizer states,
bf16 gradient accumulation, then offload or the next mode, each only where the user left the key on
auto), says why on the console, in plan.json (a `history` list) and in TensorBoard, and moves
the run to it: a new run.plan, and run.engine rebuilt through the setup's own builders
(trainer/run/setup.py) where the old engine cannot be adjusted in place. The loop then restores the
sampler to the start of the iteration, so the iteration is redone on the same windows; its partial
gradients are discarded.

- ZeRO-0 plans (the bf16_optimizer path's too, whatever stage its engine has), only checkpointing,
  activation offload or the micro-batch changing: the same engine. Its partial gradients (BF16_Optimizer's
  fp32 buffer too) are dropped, its micro-step counter rewound, and the micro-batch and accumulation set anew.
- Anything else (a ZeRO stage, offload, mode, optimizer or accumulation-dtype change, or any change
  under ZeRO 1-3, whose half-reduced gradient buckets cannot be rewound): the weights (fp32 masters)
  and Adam's moments and step count are copied to CPU memory by parameter name, the old engine is
  freed, and a new engine is built for the new plan and given them back. A mode change (full -> LoRA
  -> QLoRA) is only taken before the first optimizer step: it starts the new mode from the original
  weights, as a fresh run of that mode would, so nothing trained is dropped.
- Out of memory inside the optimizer step (the update may be half applied), or nothing left to
  give up: a one-line error naming the last checkpoint and what to try.

On several ranks every rank must run out of memory in the same iteration (they run the same
shapes, so they normally do); a rank that fails alone leaves the others waiting in a collective.

Tests inject real out-of-memory errors through GPT2DS_INJECT_OOM (trainer/run/fault_injection.py).
"""
import gc

import torch

from trainer.errors import UserError
from trainer.model.gpt2 import enable_checkpointing
from trainer.plan.planner import step_down
from trainer.plan.report import format_plan
from trainer.run import checkpoint
from trainer.run.engine import path_of_plan, set_lr
from trainer.run.run_dir import RunDir
from trainer.run.setup import build_engine, build_trained_module

# function names of the optimizer step: an error raised under them may leave the update half applied
_STEP_FUNCTIONS = {"_take_model_step", "_optimizer_step"}


def describe(exc):
    """(first line of the message, whether it was raised inside the optimizer step)."""
    tb, in_step = exc.__traceback__, False
    while tb is not None:
        in_step = in_step or tb.tb_frame.f_code.co_name in _STEP_FUNCTIONS
        tb = tb.tb_next
    return str(exc).strip().splitlines()[0][:300], in_step


# ----------------------------------------------------------------------------- state transfer

def _inner(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, 16-bit)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _stage0_fp32_copies(engine):
    """{id(16-bit parameter): its fp32 master} for DeepSpeed's stage-0 16-bit optimizer; {} otherwise."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if not (isinstance(low, list) and isinstance(high, list) and len(low) == len(high)):
        return {}
    return {id(p): q for lp, hp in zip(low, high) for p, q in zip(lp, hp) if p.shape == q.shape}


def _adam_step(engine):
    for state in _inner(engine.optimizer).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def export_state(engine):
    """Weights (fp32 masters where they exist) and Adam's moments, full size on the CPU, by name.

    Collective under ZeRO (every rank calls it). Returns (weights, moments, adam_step); moments is
    None when it could not be read (then the new engine starts them from zero, and says so).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    inner, fp32_of, step = _inner(engine.optimizer), _stage0_fp32_copies(engine), _adam_step(engine)
    weights, moments = {}, ({} if step else None)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):  # ZeRO-3, frozen: gather the partitions
            with GatheredParameters([p]):
                full = p.data.detach().float().cpu().clone()
        elif full is None:
            full = fp32_of.get(id(p), p).detach().float()
        weights[name] = full.cpu().clone()
        if p.requires_grad and moments is not None:
            try:
                avg = safe_get_full_optimizer_state(p, "exp_avg")
                sq = safe_get_full_optimizer_state(p, "exp_avg_sq")
                if avg is None:  # stage 0: torch's own state of the parameter (or its fp32 master)
                    state = inner.state[fp32_of.get(id(p), p)]
                    avg, sq = state["exp_avg"], state["exp_avg_sq"]
                moments[name] = (avg.detach().float().cpu().clone(), sq.detach().float().cpu().clone())
            except (KeyError, TypeError, ValueError, AttributeError):
                moments = None
    return weights, moments, step


def free_engine(engine):
    """Release what an engine holds while the loop still has a reference to it."""
    engine.destroy()  # DeepSpeed's own clean-up: gradient hooks, buffers
    inner = _inner(engine.optimizer)
    inner.state.clear()
    inner.param_groups.clear()
    for p in engine.module.parameters():
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        vars(p).clear()  # ZeRO's partitions and fp32 mappings hang off the parameters
    if engine.optimizer is not inner:
        vars(engine.optimizer).clear()  # ZeRO's flat buffers, partitions and buckets
    engine.optimizer = engine.basic_optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def import_state(engine, weights, moments, step):
    """Give a fresh engine the fp32 weights and Adam state exported from the old one."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner, fp32_of = _inner(engine.optimizer), _stage0_fp32_copies(engine)
    if moments is not None:
        # torch's AdamW creates its state at the first step; create it now (zeros, then filled in).
        # ZeRO-3 puts its flat fp32 partitions into the param groups only while it steps.
        masters = [hp for group in inner.param_groups for hp in group["params"]]
        masters += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
        cpu_adam = "CPUAdam" in type(inner).__name__  # DeepSpeed's CPU Adam (offload) counts steps in an int
        for hp in masters:
            inner.state[hp] = {"step": int(step) if cpu_adam else torch.tensor(step, dtype=torch.float32),
                               "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link them
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, weights[name].to(engine.device))
            if moments is not None:
                for key, value in zip(("exp_avg", "exp_avg_sq"), moments[name]):
                    safe_set_full_optimizer_state(p, value.to(engine.device), key)
        else:
            hp = fp32_of.get(id(p), p)
            with torch.no_grad():
                hp.copy_(weights[name].to(hp.device, hp.dtype))
                if hp is not p:
                    p.copy_(hp)
            if moments is not None:
                state = inner.state[hp]
                state["exp_avg"].copy_(moments[name][0])
                state["exp_avg_sq"].copy_(moments[name][1])


# ----------------------------------------------------------------------------- recovery

class Recovery:
    """Out-of-memory step-downs of one run (see the module docstring)."""

    def __init__(self, run):
        self.run = run

    def step_down(self, error):
        """Move the run to the next plan down, so that its current iteration can be redone.

        `error` is describe(exc). Updates run.engine, run.plan, run.ds_config and run.history, and
        rewrites plan.json; raises a UserError when nothing is left to give up.
        """
        run = self.run
        message, in_optimizer_step = error
        plan, iter_num = run.plan, run.iter_num
        last = checkpoint.latest_tag(run.out_dir) or "none"
        # the mode and the optimizer change only before the first step (their states cannot be carried)
        started = run.engine is not None and run.engine.global_steps > 0
        new = step_down(plan, run.plan_input, run.hw, started=started)
        if in_optimizer_step or new is None:
            why = ("inside the optimizer step, so the update may be half applied" if in_optimizer_step else
                   "and the plan has nothing left to give up within the keys you fixed")
            hint = ("continue from it with --init_from=resume; if this repeats, start a new run with "
                    "--offload=optimizer (and --mode fixed) or --mode=lora" if in_optimizer_step else
                    "set fixed plan keys back to auto, use more GPUs, or a smaller block_size")
            raise UserError(f"out of memory at iteration {iter_num} ({message}) {why}; last checkpoint: {last}; "
                            f"{hint}")

        engine_keys = ("zero_stage", "offload", "mode", "optimizer", "grad_accum_dtype", "master_weights")
        # ZeRO's half-reduced gradient buckets cannot be rewound; the ZeRO-0 paths' gradients (BF16_Optimizer's
        # fp32 buffer included, whatever stage its engine is built with) are dropped in place
        partitioned = path_of_plan(plan).optimizer in ("zero", "cpu_adam")
        rebuild = partitioned or any(getattr(new, k) != getattr(plan, k) for k in engine_keys)
        how = ("" if not rebuild else f" with a new {new.mode} engine on the original weights (no optimizer step "
               f"was taken yet)" if new.mode != plan.mode else " with a rebuilt engine (weights and optimizer state "
               "carried)")
        run.log.print(f"out of memory ({message}). iteration {iter_num}: {new.reasons['step_down']}; "
                      f"redoing the iteration{how}")
        if rebuild:
            self._rebuild(new)
        else:
            self._in_place(new)
        run.plan = new
        run.history.append({"iteration": iter_num, "error": message, "change": new.reasons["step_down"],
                            "engine_rebuilt": rebuild, "from": plan.keys(), "to": new.keys()})
        if run.master:
            RunDir(run.out_dir).write_plan(run.plan_dict)
        run.log.print(format_plan(new))
        run.log.json_text("plan", run.plan_dict, iter_num)

    def _in_place(self, new):
        """ZeRO-0: drop the partial gradients, rewind the micro-steps, set checkpointing, activation offload and
        batch sizes."""
        engine, plan = self.run.engine, self.run.plan
        engine.zero_grad()
        engine.optimizer.zero_grad()  # BF16_Optimizer keeps the accumulated gradients in its fp32 buffer
        accum = new.grad_accum_per_rank
        engine.set_train_micro_batch_size(new.micro_batch_size)
        engine.set_train_batch_size(new.micro_batch_size * accum * self.run.world)
        engine.micro_steps = engine.global_steps * accum
        if new.gradient_checkpointing and not plan.gradient_checkpointing:
            enable_checkpointing(engine.module.lm, frozen_inputs=plan.mode != "full")
        if new.activation_offload != plan.activation_offload:
            engine.module.set_activation_offload(new.activation_offload)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _rebuild(self, new):
        """Carry weights and Adam state through CPU memory into an engine for the new plan."""
        run, plan = self.run, self.run.plan
        lr = run.engine.optimizer.param_groups[0]["lr"]
        same_mode = new.mode == plan.mode
        weights, moments, step = export_state(run.engine) if same_mode else ({}, None, 0.0)
        trainable = {n: p.requires_grad for n, p in run.engine.module.named_parameters()}
        free_engine(run.engine)
        run.engine = None

        # The same architecture, its weights carried over; a 4-bit or new-mode base comes from init_from.
        carried = same_mode and new.mode != "qlora"
        module = build_trained_module(run.cfg, new, run.data.vocab_size, run.hw.device_type,
                                      model_config=RunDir(run.out_dir).model_config_path if carried else None)
        if weights:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in weights and (p.requires_grad or new.mode != "qlora"):
                        p.copy_(weights[name].to(p.dtype))
                        p.requires_grad_(trainable.get(name, p.requires_grad))
        run.engine, run.ds_config = build_engine(run, module, new)
        if weights:
            import_state(run.engine, weights, moments, step)
        set_lr(run.engine, lr)
        run.log.json_text("deepspeed_config", run.ds_config)
        if moments is None and step:
            run.log.print("the optimizer state could not be read from the old engine: Adam's moments restart at zero")
