"""LoRA and QLoRA (peft, bitsandbytes): the frozen base, the adapters on top, and rebuilding a trained run.

- lora: peft LoRA on GPT-2's `c_attn`, `c_proj`, `c_fc` (Conv1D layers, weights stored (in, out), hence
  `fan_in_fan_out=True`); everything else is frozen.
- qlora: the base loaded through transformers' BitsAndBytesConfig in 4-bit nf4 with double quantization;
  transformers turns the targeted Conv1D layers into bitsandbytes `Linear4bit` (weights (out, in), so no
  fan_in_fan_out). Embeddings, LayerNorms and biases stay in the compute dtype (bf16/fp16 on GPUs, fp32 on
  the CPU): unlike peft's `prepare_model_for_kbit_training` nothing is upcast to fp32, because the planner's
  memory model counts them in 16 bits. Of that function only what is needed is done, explicitly: the base
  is frozen (peft does it) and, with gradient checkpointing, the embedding output is made to require grad.

An adapter run's checkpoint holds only the adapters (and their optimizer state): the frozen base is rebuilt
from the run's original `init_from` (config.json) for resume, sampling, evaluation and export.
"""
import json
import logging
import pickle
import warnings
from pathlib import Path

import torch

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel for its packed
# inference layout is missing; the trainer never uses that layout (use_dequantizing_matmul).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from trainer.checkpoint import consolidated_state_dict  # noqa: E402
from trainer.config import ADAPTER_MODES  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.model import HUB_NAMES, build_model, crop_block_size, load_pretrained, remove_biases  # noqa: E402
from trainer.ranks import local_rank  # noqa: E402

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def uses_adapters(plan_or_mode):
    mode = plan_or_mode if isinstance(plan_or_mode, str) else plan_or_mode.mode
    return mode in ADAPTER_MODES


def lora_config(cfg, quantized=False):
    """The LoRA config of a run. `quantized`: the targets are bitsandbytes Linear4bit layers, stored (out, in)."""
    from peft import LoraConfig  # imported here: peft pulls in bitsandbytes, which full runs do not need
    return LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=list(cfg["lora_targets"]), fan_in_fan_out=not quantized, bias="none",
                      task_type="CAUSAL_LM")


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

    cfg['init_from'] is the run's original source (on resume, the one saved in out_dir/config.json);
    run_dir is the trained run being rebuilt (resume, sampling, export), named if its base is gone.
    """
    source = cfg["init_from"]
    run = run_dir
    if run and source not in HUB_NAMES + ("scratch",) and not (Path(source) / "config.json").is_file():
        raise UserError(f"the base weights of the adapter run {run}, init_from={source!r}, are no longer there "
                        f"(adapter checkpoints hold only the adapters); put the base back at that path")
    if mode != "qlora":
        return build_model(cfg, vocab_size)
    check_source(mode, cfg["init_from"])
    model = load_quantized(cfg["init_from"], cfg["dropout"], TORCH_DTYPES[dtype], device_type)
    crop_block_size(model, cfg["block_size"])
    if not cfg["bias"]:
        remove_biases(model)
    return model


def wrap_lora(model, config):
    """get_peft_model, without transformers' deprecation warning that peft 0.21 triggers on every call."""
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


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


# ----------------------------------------------------------------------------- trained adapter runs

def run_config(out_dir):
    return json.loads((Path(out_dir) / "config.json").read_text())


def run_mode(out_dir):
    """The mode a run trained in: its plan's (config.json may say 'auto')."""
    plan = Path(out_dir) / "plan.json"
    if plan.is_file():
        return json.loads(plan.read_text())["mode"]
    return run_config(out_dir)["mode"]


def run_dtype(out_dir):
    plan = Path(out_dir) / "plan.json"
    return json.loads(plan.read_text()).get("dtype", "fp32") if plan.is_file() else "fp32"


def adapter_state_dict(out_dir):
    """The adapters of the latest checkpoint as fp32 tensors, keyed as in the PeftModel's state_dict.

    ZeRO 1-3 checkpoints go through DeepSpeed's zero_to_fp32 (under ZeRO-3 the module file holds empty,
    shape-[0] tensors: the real values are only in the optimizer shards).
    """
    state = {k: v for k, v in consolidated_state_dict(out_dir).items() if ".lora_" in k}
    if not state:
        raise UserError(f"the checkpoint in {out_dir} holds no LoRA adapters; was it trained with --mode=full?")
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise UserError(f"the checkpoint in {out_dir} holds empty adapter tensors ({empty[0]}); it is incomplete")
    return state


def load_adapter_run(out_dir, quantized=None, weights=None):
    """A trained adapter run as a PeftModel (eval mode, fp32 on the CPU): base rebuilt, adapters loaded.

    quantized=None: as trained (4-bit base for qlora); False: the adapters on the original, unquantized
    weights (Conv1D layers), which is what export merges into. weights: adapter_state_dict(out_dir), if
    the caller already has it.
    """
    out_dir = Path(out_dir)
    cfg = run_config(out_dir)
    mode = run_mode(out_dir)
    if mode not in ADAPTER_MODES:
        raise UserError(f"{out_dir} trained in mode {mode!r}, not lora or qlora")
    quantized = (mode == "qlora") if quantized is None else quantized
    with open(out_dir / "meta.pkl", "rb") as f:
        vocab_size = pickle.load(f)["vocab_size"]
    weights = adapter_state_dict(out_dir) if weights is None else weights
    torch.manual_seed(cfg["seed"])  # a scratch base is rebuilt from the run's seed, as the loop built it
    base = build_base({**cfg, "dropout": 0.0}, vocab_size, "qlora" if quantized else "lora", "fp32", "cpu",
                      run_dir=out_dir)
    model = wrap_lora(base, lora_config(cfg, quantized=quantized))
    if quantized:
        use_dequantizing_matmul(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if ".lora_" in k]
    if missing or unexpected:
        raise UserError(f"the adapters in {out_dir} do not match its config.json (lora_r, lora_targets): "
                        f"missing {missing[:2]}, unexpected {unexpected[:2]}")
    return model.eval()
