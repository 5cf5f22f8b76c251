"""Fault injection for tests of the recovery paths: real failures at chosen iterations.

GPT2DS_INJECT_NAN="5,6" makes the training loss of those iterations NaN (a real non-finite loss,
whose backward gives non-finite gradients), so the NaN guard can be tested on a healthy model.
GPT2DS_INJECT_OOM="3,5" raises a real torch.OutOfMemoryError in the last micro-batch of those
iterations, once each, before its forward pass (the earlier micro-batches' gradients are already
accumulated and must be discarded), so the out-of-memory step-down can be tested on a CPU.
GPT2DS_INJECT_NAN_WEIGHTS="3" makes one trainable weight NaN right after the step of iteration 3 (its loss
and gradients finite), as a step that blows the weights up does, so the guard's check of the weights after a
step can be tested apart from a real divergence.

GPT2DS_PAUSE_AT="building the engine" makes the setup wait at that stage boundary (trainer/run/interrupts.py
stop_point), after printing `paused at: <stage>` on stderr, until a signal has arrived (at most 120 s), so a
test can deliver a real signal at each stage of the setup.

The setup installs them on each engine it builds (trainer/run/setup.py) by wrapping the engine's
forward; unset (normal use) nothing is wrapped, nothing waits, and the loop carries no trace of them.
"""
import os
import sys
import time

import torch

NAN_VARIABLE = "GPT2DS_INJECT_NAN"
OOM_VARIABLE = "GPT2DS_INJECT_OOM"
NAN_WEIGHTS_VARIABLE = "GPT2DS_INJECT_NAN_WEIGHTS"
PAUSE_VARIABLE = "GPT2DS_PAUSE_AT"
PAUSE_LIMIT_S = 120


def iterations(variable):
    text = os.environ.get(variable, "")
    return {int(part) for part in text.split(",") if part.strip()}


NAN_ITERS = iterations(NAN_VARIABLE)
OOM_ITERS = iterations(OOM_VARIABLE)
NAN_WEIGHT_ITERS = iterations(NAN_WEIGHTS_VARIABLE)
_oom_raised = set()  # once per iteration, across the engines a step-down builds


def install(engine, run):
    """Wrap engine.forward with the injections listed in the variables (training forward passes only)."""
    if not (NAN_ITERS or OOM_ITERS or NAN_WEIGHT_ITERS):
        return
    forward, step = engine.forward, engine.step

    def step_with_faults(*args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        result = step(*args, **kwargs)
        if boundary and run.iter_num in NAN_WEIGHT_ITERS:
            weight = next(p for p in engine.module.parameters() if p.requires_grad)
            with torch.no_grad():
                getattr(weight, "ds_tensor", weight).view(-1)[0] = float("nan")
        return result

    def forward_with_faults(*args, **kwargs):
        it = run.iter_num
        training = engine.training  # evaluation passes are left alone
        if training and it in OOM_ITERS and it not in _oom_raised and engine.is_gradient_accumulation_boundary():
            _oom_raised.add(it)
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_VARIABLE} at iteration {it})")
        loss = forward(*args, **kwargs)
        return loss * float("nan") if training and it in NAN_ITERS else loss

    engine.forward = forward_with_faults
    engine.step = step_with_faults


def pause_at(stage, signalled):
    """GPT2DS_PAUSE_AT=stage: wait here until signalled() (a signal has arrived), at most PAUSE_LIMIT_S."""
    if os.environ.get(PAUSE_VARIABLE) != stage:
        return
    print(f"paused at: {stage}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not signalled() and time.monotonic() < deadline:
        time.sleep(0.01)
