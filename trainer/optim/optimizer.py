"""The optimizer a run steps with: AdamW with nanoGPT's parameter groups and the config's hyperparameters.

trainer/run/engine.py hands these to DeepSpeed; trainer/plan/simulate.py builds the same optimizer on
fake tensors, so the simulated step is the trained one.
"""
ADAM_EPS = 1e-8


LR_RATIO = "lr_ratio"  # a group's learning rate is the schedule's times this (set_lr keeps it)


def param_groups(model_or_params, weight_decay, loraplus_lr_ratio=1.0):
    """nanoGPT's rule: decay 2-D weights (matmuls, embeddings), not biases or LayerNorms; decayed first.

    Takes a module (its trainable parameters) or the parameters themselves (the simulation's fp32 masters).
    LoRA+ (loraplus_lr_ratio != 1, a module with LoRA adapters): LoRA's B matrices get a group of their own
    after the decayed one, whose learning rate is the schedule's times the ratio (its LR_RATIO)."""
    if hasattr(model_or_params, "named_parameters"):
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    else:
        named = [("", p) for p in model_or_params if p.requires_grad]
    lora_b = [p for n, p in named if ".lora_B." in n] if loraplus_lr_ratio != 1 else []
    in_b = {id(p) for p in lora_b}
    decay = [p for n, p in named if p.dim() >= 2 and id(p) not in in_b]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if lora_b:  # B is 2-D: decayed like every matrix
        groups.append({"params": lora_b, "weight_decay": weight_decay, LR_RATIO: loraplus_lr_ratio})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def group_lr(group, lr):
    """The learning rate of one optimizer group when the schedule says `lr` (LoRA+'s B group: lr x ratio)."""
    return lr * group.get(LR_RATIO, 1.0)


def adamw_hyperparameters(cfg):
    """AdamW's settings from the config: what DeepSpeed's optimizer section and the simulation both use."""
    return {"lr": cfg["learning_rate"], "betas": (cfg["beta1"], cfg["beta2"]), "eps": ADAM_EPS,
            "weight_decay": cfg["weight_decay"]}
