"""LoRA and QLoRA (peft, bitsandbytes): the frozen base and the adapters on top.

- lora: peft LoRA on GPT-2's `c_attn`, `c_proj`, `c_fc` (Conv1D layers, weights stored (in, out), hence
  `fan_in_fan_out=True`); everything else is frozen.
- variants (config keys, docs/lora.md): DoRA (use_dora), rsLoRA (use_rslora), PiSSA/OLoRA initialisation
  (lora_init: the adapters start as a decomposition of each weight, which the base keeps the rest of), all
  peft's; LoRA+ is an optimizer setting (trainer/optim/optimizer.param_groups).
- qlora: the base loaded through transformers' BitsAndBytesConfig in 4-bit nf4 with double quantization;
  transformers turns the targeted Conv1D layers into bitsandbytes `Linear4bit` (weights (out, in), so no
  fan_in_fan_out). Embeddings, LayerNorms and biases stay in the compute dtype (bf16/fp16 on GPUs, fp32 on
  the CPU): unlike peft's `prepare_model_for_kbit_training` nothing is upcast to fp32, because the planner's
  memory model counts them in 16 bits. Of that function only what is needed is done, explicitly: the base
  is frozen (peft does it) and, with gradient checkpointing, the embedding output is made to require grad.

An adapter run's checkpoint holds only the adapters (and their optimizer state): the frozen base is rebuilt
from the run's original `init_from` (config.json) for resume (build_base) and for sampling, evaluation and
export (trainer/tools/loading.py).
"""
import logging
import warnings
from pathlib import Path


# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel for its packed
# inference layout is missing; the trainer never uses that layout (use_dequantizing_matmul).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from trainer.config import ADAPTER_MODES  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.launcher import local_rank  # noqa: E402
from trainer.model import nanogpt  # noqa: E402
from trainer.model.gpt2 import TORCH_DTYPES, build_model, fit_to_config, load_pretrained  # noqa: E402
from trainer.model.shapes import HUB_NAMES  # noqa: E402


def uses_adapters(plan_or_mode):
    mode = plan_or_mode if isinstance(plan_or_mode, str) else plan_or_mode.mode
    return mode in ADAPTER_MODES


def lora_config(cfg, quantized=False):
    """The LoRA config of a run. `quantized`: the targets are bitsandbytes Linear4bit layers, stored (out, in)."""
    from peft import LoraConfig  # imported here: peft pulls in bitsandbytes, which full runs do not need
    init = True if cfg.lora_init == "default" else cfg.lora_init
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), fan_in_fan_out=not quantized, bias="none",
                      task_type="CAUSAL_LM", use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                      init_lora_weights=init)


def quantization_config(compute_dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _bnb_linear4bit_type():
    import bitsandbytes as bnb
    return bnb.nn.Linear4bit


def use_dequantizing_matmul(model):
    """Keep bitsandbytes' 4-bit layers on one CPU code path in training and evaluation alike.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight into an inference-only
    layout the first time it runs in eval mode without grad (our evaluation at iteration 0), and the
    layer keeps that layout: the next training step then fails in the packed kernel, and evaluation
    computes in bf16 instead of the compute dtype. Turning the repacking off leaves every forward on the
    dequantize-then-matmul path (no effect on GPUs).
    """
    linear4bit = _bnb_linear4bit_type()
    for module in model.modules():
        if isinstance(module, linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_quantized(source, dropout, compute_dtype, device_type="cpu"):
    """GPT-2 from the hub or an HF directory with its projections in 4-bit nf4 (double quantization)."""
    kwargs = {}
    if device_type == "cuda":  # quantize straight onto this rank's GPU (its index on this node)
        kwargs["device_map"] = {"": local_rank()}
    model = load_pretrained(source, dropout, dtype=compute_dtype,
                            quantization_config=quantization_config(compute_dtype), **kwargs)
    use_dequantizing_matmul(model)
    return model


def check_source(mode, init_from):
    if mode == "qlora" and init_from == "scratch":
        raise UserError("mode=qlora quantizes pretrained weights, but init_from='scratch' has none; use "
                        "--mode=full (or lora), or --init_from=gpt2 (any GPT-2 hub name or HF directory)")


def build_base(cfg, vocab_size, mode, dtype="fp32", device_type="cpu", run_dir=None):
    """The frozen base of an adapter run: build_model's GPT-2, or for qlora the same weights in 4 bits.

    cfg.init_from is the run's original source (on resume, the one saved in out_dir/config.json);
    run_dir is the trained run being rebuilt (resume, sampling, export), named if its base is gone.
    """
    source = cfg.init_from
    on_disk = (Path(source) / "config.json").is_file() or nanogpt.checkpoint_path(source) is not None
    if run_dir and source not in HUB_NAMES + ("scratch",) and not on_disk:
        raise UserError(f"the base weights of the adapter run {run_dir}, init_from={source!r}, are no longer there "
                        f"(adapter checkpoints hold only the adapters); put the base back at that path")
    if mode != "qlora":
        return build_model(cfg, vocab_size)
    check_source(mode, cfg.init_from)
    return fit_to_config(load_quantized(cfg.init_from, cfg.dropout, TORCH_DTYPES[dtype], device_type), cfg)


def wrap_lora(model, config):
    """get_peft_model, without transformers' deprecation warning that peft 0.21 triggers on every call.

    OLoRA on GPT-2's Conv1D layers: peft 0.21's olora_init takes the weight as (out, in) whatever
    fan_in_fan_out says, and on a Conv1D (in, out) it makes A and B of the wrong shapes (the first forward
    fails). The layers are wrapped with the default start, then each gets peft's own olora_init with its
    weight presented (out, in) for the call (olora_conv1d).
    """
    import dataclasses

    from peft import get_peft_model
    olora_conv1d = config.init_lora_weights == "olora" and config.fan_in_fan_out
    if olora_conv1d:
        config = dataclasses.replace(config, init_lora_weights=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, config)
    if olora_conv1d:
        olora_init_conv1d(model)
        model.peft_config["default"].init_lora_weights = "olora"
    return model


def olora_init_conv1d(model, adapter="default"):
    """peft's olora_init on every LoRA layer of `model`, each Conv1D weight transposed to (out, in) around it."""
    from peft.tuners.lora import LoraLayer
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            weight = layer.get_base_layer().weight
            weight.data = weight.data.t().contiguous()
            layer.olora_init(adapter)  # A = R[:r], B = Q[:, :r]; the base keeps W - scale * B @ A
            weight.data = weight.data.t().contiguous()


def _keep_only_trainable(module, state_dict, prefix, local_metadata):
    """state_dict() of an adapter model holds the adapters only.

    DeepSpeed's exclude_frozen_parameters drops frozen parameters by their first name only, so the
    tied lm_head.weight (the whole embedding) and bitsandbytes' quantization constants would stay.
    """
    del local_metadata
    keep = {prefix + name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def apply_mode(model, plan, cfg):
    """Full mode trains the model as it is; LoRA/QLoRA wrap it so that only the adapters train."""
    if not uses_adapters(plan):
        return model
    model = wrap_lora(model, lora_config(cfg, quantized=plan.mode == "qlora"))
    if plan.mode == "qlora":
        use_dequantizing_matmul(model)
    if plan.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; the adapters inside need it.
        model.enable_input_require_grads()
    model.register_state_dict_post_hook(_keep_only_trainable)
    return model
