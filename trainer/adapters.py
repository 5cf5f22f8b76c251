"""LoRA adapters on GPT-2's projections (peft), for the plan's lora and qlora modes."""
from peft import LoraConfig, get_peft_model


def uses_adapters(plan):
    return plan.mode in ("lora", "qlora")


def lora_config(cfg):
    # GPT-2's c_attn/c_proj/c_fc are Conv1D layers: weight stored (in, out), hence fan_in_fan_out.
    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=list(cfg["lora_targets"]), fan_in_fan_out=True, bias="none",
                      task_type="CAUSAL_LM")


def apply_mode(model, plan, cfg):
    """Full mode trains the model as it is; LoRA wraps it so that only adapters train."""
    if not uses_adapters(plan):
        return model
    model = get_peft_model(model, lora_config(cfg))
    if plan.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; adapters inside need it.
        model.enable_input_require_grads()
    return model
