"""The plan as people and scripts read it: a table for the console (format_plan) and flat JSON for
`--plan --json` and out_dir/plan.json (plan_to_dict; its keys are a contract scripts rely on)."""
from trainer.plan.planner import Plan
from trainer.units import format_bytes

_PHASE_NOTE = {
    "activations": "forward/backward",
    "logits_and_loss": "forward/backward",
    "optimizer_step_transient": "optimizer step, after activations are freed",
    "offloaded_to_host": "offload on a CPU-only machine stays in the same memory",
}


def plan_to_dict(plan: Plan):
    """The plan as plain JSON-able data: the plan keys, per-item bytes, totals, budget and reasons."""
    est, hw = plan.estimate, plan.hardware
    return {**plan.keys(), "grad_accum_per_rank": plan.grad_accum_per_rank, "n_devices": hw.n_devices,
            "params_total": est.params_total, "params_trainable": est.params_trainable, "memory": dict(est.items),
            "total_bytes": est.total, "usable_bytes": plan.usable_bytes, "reasons": dict(plan.reasons),
            "hardware": hw.name, "allocated_bytes": est.allocated, "host_bytes": est.host,
            "device_bytes": hw.bytes_per_device, "device_type": hw.device_type, "block_size": plan.block_size,
            "sequences_per_iteration": plan.sequences_per_iteration,
            "tokens_per_iteration": plan.tokens_per_iteration, "zero_buckets": dict(est.buckets),
            "model_states": dict(est.states), "fits": est.total <= plan.usable_bytes,
            "step_time": round(plan.step_time, 4), "runners_up": list(plan.runners_up)}


def format_plan(plan: Plan):
    """A human-readable plan: keys, per-item memory, usable memory and the reason for each choice."""
    est, n = plan.estimate, plan.n_devices
    lines = [f"plan for {plan.hardware.name} ({plan.device_type}, {n} rank{'s' if n > 1 else ''})"]
    values = {"mode": plan.mode, "zero_stage": plan.zero_stage, "offload": plan.offload,
              "gradient_checkpointing": "on" if plan.gradient_checkpointing else "off",
              "micro_batch_size": plan.micro_batch_size, "grad_accum_per_rank": plan.grad_accum_per_rank,
              "dtype": plan.dtype, "optimizer": plan.optimizer, "grad_accum_dtype": plan.grad_accum_dtype,
              "master_weights": plan.master_weights,
              "optimizer_in_backward": "on" if plan.optimizer_in_backward else "off",
              "activation_offload": "on" if plan.activation_offload else "off", "step_time": f"{plan.step_time:.2f}x"}
    for key, value in values.items():
        lines.append(f"  {key:<24}{value!s:<12}{plan.reasons.get(key, '')}")
    lines.append(f"  {'parameters':<24}{est.params_total:,} total, {est.params_trainable:,} trainable")
    lines.append(f"  {'tokens per iteration':<24}{plan.tokens_per_iteration:,} "
                 f"({plan.sequences_per_iteration} sequences of {plan.block_size})")
    lines.append("memory per device (estimated):")
    for item, value in est.items.items():
        if item == "offloaded_to_host" and not value:
            continue
        lines.append(f"  {item:<28}{format_bytes(value):>12}  {_PHASE_NOTE.get(item, '')}")
    lines.append(f"  {'peak':<28}{format_bytes(est.total):>12}  states + buckets + max(forward/backward, "
                 f"optimizer step) + context and fragmentation")
    lines.append(f"  {'usable':<28}{format_bytes(plan.usable_bytes):>12}  {plan.reasons.get('budget', '')}")
    if est.host and plan.device_type == "cuda":
        lines.append(f"  {'CPU memory for offload':<28}{format_bytes(est.host):>12}  per rank")
    if plan.runners_up:
        lines.append("runners-up (estimated time per iteration, peak memory; why they lost):")
        for row in plan.runners_up:
            lines.append(f"  {row['plan']:<62}{row['step_time']:>6.2f}x {format_bytes(row['total_bytes']):>10}  "
                         f"{row['why']}")
    if "step_down" in plan.reasons:
        lines.append(f"step-down: {plan.reasons['step_down']}")
    return "\n".join(lines)
