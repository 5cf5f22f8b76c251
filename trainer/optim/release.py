"""The optimizer step inside the backward (plan key optimizer_in_backward): gradient release.

A post-accumulate-grad hook on every trainable parameter steps that one tensor and frees its gradient as soon as
backward has completed it: no gradient is ever held whole, only the one in flight. DeepSpeed's engine.step()
then finds no gradient left: its optimizer.step() steps nothing and its zero_grad frees nothing.
  - master_weights=bf16_kahan: torch-optimi 0.3.3's own gradient release (optimi/gradientrelease.py
    prepare_for_gradient_release: optimizer.step(param=p), then its zero_grad(param=p)).
  - master_weights=bf16_sr (torchao's _AdamW or AdamW4bit): torchao has no per-tensor step, and its step()
    steps every tensor that has a gradient. Here step_one hands it a view of the tensor's group holding that
    one tensor (the group's own lr tensor, betas, decay: the schedule reaches it), then frees the gradient.
    Its states are the optimizer's own (keyed by the tensor), so its state_dict, checkpoints and resume are
    those of the ordinary step.

A hook of ours runs first on each tensor (hooks run in the order registered), because the update is applied
before the iteration's gradient norm could be known:
  - its norm (one host sync per tensor); a non-finite one raises NonFiniteGradient before that tensor is
    stepped, and the run stops with the guard's line (the tensors before it are already stepped, so the step
    cannot be skipped as the other paths skip it; nothing is saved, the last good checkpoint stays);
  - clipping per tensor: each tensor's gradient is clipped to grad_clip on its own (torch's
    clip_grads_with_norm_ on that tensor), not the global norm, which exists only after the last hook;
  - the iteration's global norm (of the unclipped gradients) is summed from the tensors' norms, for the log.
A non-finite loss is seen before its backward (GradientRelease.finite): that step is skipped whole, as on the
other paths.
"""
import math

import torch


class NonFiniteGradient(Exception):
    """A tensor's gradient is not finite; the tensors stepped before it in this backward stay stepped."""


class GradientRelease:
    def __init__(self, module, optimizer, max_norm):
        self.max_norm, self.sum_sq = max_norm, 0.0
        self.names = {p: name for name, p in module.named_parameters() if p.requires_grad}
        for p in self.names:
            p.register_post_accumulate_grad_hook(self.check)
        step_in_backward(module, optimizer)  # after ours: they step

    def check(self, param):
        norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)
        value = float(norm)
        if not math.isfinite(value):
            raise NonFiniteGradient(self.names[param])
        self.sum_sq += value * value
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([param], self.max_norm, norm)

    def finite(self, loss):
        """Whether to run this loss's backward (which steps the weights): not for a non-finite loss."""
        if math.isfinite(float(loss.detach())):
            return True
        self.sum_sq = math.nan
        return False

    def take_norm(self):
        """The global norm of this iteration's unclipped gradients (nan for a skipped step); resets it."""
        norm, self.sum_sq = math.sqrt(self.sum_sq), 0.0
        return norm


def step_in_backward(module, optimizer):
    """The hooks that step each trainable tensor of `module` with `optimizer` and free its gradient (also what
    trainer/plan/simulate.py runs on fake tensors, without GradientRelease's norm check: a host sync)."""
    from optimi.optimizer import OptimiOptimizer
    if isinstance(optimizer, OptimiOptimizer):
        from optimi import prepare_for_gradient_release
        prepare_for_gradient_release(module, optimizer, ignore_existing_hooks=True)
        # optimi keeps each tensor's param group in its state (state["group"]): a checkpoint would save a copy
        # of it (its lr frozen, its params list); saved without it, and pointed back at the live groups on
        # load, so the schedule's learning rate (trainer/run/engine.set_lr) reaches a resumed run's steps
        optimizer.register_state_dict_post_hook(_without_groups)
        optimizer.register_load_state_dict_post_hook(_point_at_groups)
        return
    # by index: load_state_dict replaces the group dicts (a resumed run's lr tensors are new ones)
    group_of = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}

    def step_one(param):
        """Step one tensor with an optimizer whose step() steps every tensor with a gradient (torchao's)."""
        groups = optimizer.param_groups
        optimizer.param_groups = [{**groups[group_of[param]], "params": [param]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        param.grad = None

    for p in module.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(step_one)


def _without_groups(optimizer, state_dict):
    state_dict["state"] = {k: {n: v for n, v in s.items() if n != "group"} for k, s in state_dict["state"].items()}
    return state_dict


def _point_at_groups(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["group"] = group
