"""The optimizer a run steps with: AdamW with nanoGPT's parameter groups and the config's hyperparameters.

trainer/run/engine.py hands these to DeepSpeed; trainer/plan/simulate.py builds the same optimizer on
fake tensors, so the simulated step is the trained one.
"""
ADAM_EPS = 1e-8


def param_groups(model_or_params, weight_decay):
    """nanoGPT's rule: decay 2-D weights (matmuls, embeddings), not biases or LayerNorms; decayed first.

    Takes a module (its trainable parameters) or the parameters themselves (the simulation's fp32 masters)."""
    params = model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw_hyperparameters(cfg):
    """AdamW's settings from the config: what DeepSpeed's optimizer section and the simulation both use."""
    return {"lr": cfg["learning_rate"], "betas": (cfg["beta1"], cfg["beta2"]), "eps": ADAM_EPS,
            "weight_decay": cfg["weight_decay"]}
