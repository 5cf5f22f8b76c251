"""The optimizer a run steps with: AdamW (torch's, bitsandbytes', torch-optimi's, torchao's) with nanoGPT's
parameter groups, or Adam-mini with its own, and the config's hyperparameters; and the bytes of their states.

trainer/run/engine.py hands these to DeepSpeed; trainer/plan/simulate.py builds the same optimizer on
fake tensors, so the simulated step is the trained one.
"""
import math

from trainer.optim.quantized_states import keep_in_plain_tensors

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
    return {"lr": cfg.learning_rate, "betas": (cfg.beta1, cfg.beta2), "eps": ADAM_EPS,
            "weight_decay": cfg.weight_decay}


# ----------------------------------------------------------------------------- bitsandbytes' optimizers
# The `optimizer` key: torch's AdamW (32-bit states, built by DeepSpeed from its config) or one of
# bitsandbytes' AdamW classes, handed to DeepSpeed as a client optimizer (trainer/run/engine.py).
BNB_CLASSES = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}
# bitsandbytes 0.50 (optim/optimizer.py Optimizer2State.init_state): a tensor smaller than min_8bit_size keeps
# 32-bit states; 8-bit states are one byte per element per moment plus an fp32 absmax per block of 256 elements
# per moment, and two 256-entry fp32 code books shared by all tensors; paged buffers only from 1e5 elements.
MIN_8BIT_SIZE = 4096
BLOCKSIZE_8BIT = 256
CODEBOOK_BYTES = 2 * 256 * 4


def is_client(name):
    """bitsandbytes' optimizers and Adam-mini go to DeepSpeed as a client optimizer; torch's AdamW comes from its
    config."""
    return name in BNB_CLASSES or name == "adam_mini"


def is_8bit(name):
    return name in ("adamw8bit", "paged_adamw8bit")


def is_paged(name):
    return name.startswith("paged_")


def unpaged(name):
    """What a paged optimizer is without CUDA's unified memory: the same updates, states in ordinary memory."""
    return name.removeprefix("paged_")


def state_bytes(name, numels):
    """Bytes of AdamW's two moments for tensors of these element counts (the tensors the optimizer steps:
    the parameters, or the flat partitions DeepSpeed hands it)."""
    if not is_8bit(name):
        return 8 * sum(numels)
    total = 0
    for n in numels:
        if n < MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BLOCKSIZE_8BIT)
    return total + (CODEBOOK_BYTES if any(n >= MIN_8BIT_SIZE for n in numels) else 0)


def client_optimizer(name, groups, cfg):
    """bitsandbytes' optimizer for `name` over the parameter groups, or None for adamw (DeepSpeed builds torch's
    AdamW from its config). Its hyperparameters are the config's, as for torch's."""
    if name not in BNB_CLASSES:
        return None
    import bitsandbytes as bnb
    return getattr(bnb.optim, BNB_CLASSES[name])(groups, **adamw_hyperparameters(cfg))


# ----------------------------------------------------------------------------- bf16 weights without fp32 masters
# master_weights (trainer/config.MASTER_WEIGHTS) other than fp32: the optimizer steps the bf16 parameters
# themselves, as DeepSpeed's client optimizer (the bf16_weights path of trainer/plan/memory.py).
#   bf16_kahan  torch-optimi 0.3.3's AdamW, kahan_sum=True (optimi/adam.py _single_param_adam): exp_avg, exp_avg_sq
#               and the Kahan compensation, each zeros_like the bf16 parameter: 6 bytes per element. Its
#               decoupled weight decay is torch's (p *= 1 - lr * wd); its debiased betas replace Adam's bias
#               correction. foreach=False: one tensor's temporary at a time (exp_avg_sq.sqrt(), 2 bytes per
#               element of the largest) instead of the whole model's.
#   bf16_sr     torchao 0.18's AdamW with 32-bit math and bf16 stochastic rounding of the result
#               (torchao/optim/adam.py _AdamW, bf16_stochastic_round=True): its moments are zeros_like the bf16
#               parameter (block_size inf: never quantized), 4 bytes per element; its step is compiled per
#               tensor (torch.compile, fullgraph), which on the CPU needs a C++ compiler.
#   bf16        torch's AdamW on the bf16 parameters (states zeros_like them: 4 bytes per element), every update
#               rounded to nearest: the danger bench/optimizer_parity.py's masters_* experiments measure; never
#               chosen by auto.
MASTER_STATE_BYTES = {"bf16_kahan": 6, "bf16_sr": 4, "bf16": 4}
# and per tensor a step counter: an fp32 scalar tensor in torch's and torchao's state, a float in optimi's group
STEP_COUNTER_BYTES = {"bf16_kahan": 0, "bf16_sr": 4, "bf16": 4}
# Per element of the largest tensor, beside its states (each steps one tensor at a time; simulated on fake
# tensors, trainer/plan/simulate.py): optimi's exp_avg_sq.sqrt() (bf16); torch's per-tensor AdamW, sqrt and its
# scaled copy (bf16); torchao's fp32 math run eagerly, 41 bytes (its fp32 copies of p, grad and the moments and
# every intermediate; compiled, inductor fuses most of them, so this is an upper bound)
MASTER_STEP_TEMP_BYTES = {"bf16_kahan": 2, "bf16_sr": 41, "bf16": 2 * 2}


# optimizer=adamw4bit (with bf16_sr): torchao 0.18's AdamW4bit, bf16_stochastic_round=True, per tensor. A tensor of
# at least 4096 elements whose count the block (128) divides gets, per moment, packed 4-bit codes (n/2 bytes), an
# fp32 scale per block and its own 16-entry fp32 map (optim/subclass_4bit.py OptimState4bit.zeros); the others
# keep moments zeros_like the bf16 parameter; an fp32 step counter per tensor. Under DeepSpeed's fp32-master paths
# it would get flat partitions, whose counts the block rarely divides: unquantized, so it runs on bf16 weights only.
BLOCKSIZE_4BIT, QMAP_4BIT_BYTES = 128, 16 * 4
# its step run eagerly, per element of the largest tensor (simulated; compiled, inductor fuses most of it)
ADAMW4BIT_TEMP_BYTES = 41


def adamw4bit_state_bytes(numels):
    total = 0
    for n in numels:
        if n >= MIN_8BIT_SIZE and n % BLOCKSIZE_4BIT == 0:
            total += 2 * (n // 2 + 4 * (n // BLOCKSIZE_4BIT) + QMAP_4BIT_BYTES)
        else:
            total += 2 * 2 * n
    return total + 4 * len(numels)


# ----------------------------------------------------------------------------- Adam-mini: factored second moments
# optimizer=adam_mini: Adam-mini 1.1.1 (adam_mini/adam_mini.py), full mode, stepping the model's own parameters
# (the plain fp32 path, or bf16 weights with master_weights=bf16: DeepSpeed's fp32-master paths hand an optimizer
# flat partitions, where Adam-mini cannot see a tensor's rows). It keeps Adam's first moment (zeros_like the
# parameter) and, in place of the second, one mean of the squared gradient per block, by the tensor's name:
#   "bias" in it        plain Adam (a second moment per element)
#   a row block         one per row: embeddings (wte, and wpe, added here: per token, per position), and the
#                       projections, which GPT-2 names c_attn, attn.c_proj, mlp.* (the first two added here:
#                       Adam-mini's defaults know q_proj/k_proj/v_proj and o_proj). GPT-2's projections are
#                       Conv1D, weights (in, out): a row is an input feature's outgoing weights, not an output
#                       neuron as for the nn.Linear Adam-mini was designed on; its per-head rule for queries and
#                       keys (q_proj, k_proj) matches none of GPT-2's fused c_attn, which gets one per row
#   anything else       one for the whole tensor (the LayerNorms' weights)
# Its step counters are Python ints. Its decay skips names with "norm", "ln" or "bias": for GPT-2 exactly the
# 1-D tensors, nanoGPT's rule (param_groups).
ADAM_MINI_NAMES = {"embd_names": ("wpe",), "wv_names": ("c_attn",), "attn_proj_names": ("attn.c_proj",)}
_ADAM_MINI_ROWS = ("embed", "embd", "wte", "wpe", "lm_head", "output", "final_layer", "v_proj", "wv", "value",
                   "c_attn", "o_proj", "wo", "attn.proj", "attn.c_proj", "feed_forward", "linear", "mlp")
# its step per tensor: the squared gradient, then the update and its negation (2 per element of the largest)
ADAM_MINI_TEMP_ELEMENTS = 2


def adam_mini_block(name):
    """How Adam-mini 1.1.1 (with ADAM_MINI_NAMES added) keeps this tensor's second moment: 'elements' (plain
    Adam), 'rows' or 'tensor' (one mean); the order of its step's tests."""
    name = name.lower()
    if "bias" in name:
        return "elements"
    return "rows" if any(key in name for key in _ADAM_MINI_ROWS) else "tensor"


def adam_mini_state_bytes(named_shapes, element_bytes):
    """Bytes of Adam-mini's states for tensors (name, shape) of `element_bytes` each (the parameters' dtype)."""
    total = 0
    for name, shape in named_shapes:
        n = math.prod(shape)
        second = {"elements": n, "rows": shape[0], "tensor": 1}[adam_mini_block(name)]
        total += (n + second) * element_bytes
    return total


def adam_mini_optimizer(module, cfg):
    """Adam-mini over the module's trainable parameters (one group per tensor, its own), the config's
    hyperparameters. world_size 1: its cross-rank sums are for sharded tensors; at ZeRO-0 every rank holds each
    whole tensor with the same averaged gradient (and it counts ranks by torch.cuda.device_count())."""
    from adam_mini import Adam_mini
    hyper = adamw_hyperparameters(cfg)
    optimizer = Adam_mini([(n, p) for n, p in module.named_parameters() if p.requires_grad], lr=hyper["lr"],
                          betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"], verbose=False)
    for names, added in ADAM_MINI_NAMES.items():
        getattr(optimizer, names).update(added)
    optimizer.world_size = 1
    return optimizer


def master_state_bytes(master_weights, numels, optimizer="adamw"):
    if optimizer == "adamw4bit":
        return adamw4bit_state_bytes(numels)
    return MASTER_STATE_BYTES[master_weights] * sum(numels) + STEP_COUNTER_BYTES[master_weights] * len(numels)


def master_step_temporaries(master_weights, numels, optimizer="adamw"):
    per_element = ADAMW4BIT_TEMP_BYTES if optimizer == "adamw4bit" else MASTER_STEP_TEMP_BYTES[master_weights]
    return per_element * max(numels)


def master_optimizer(master_weights, groups, cfg, optimizer="adamw", released=False):
    """The client optimizer over the bf16 parameters for `master_weights` (not fp32) and `optimizer` (adamw, or
    adamw4bit with bf16_sr), with the config's AdamW hyperparameters; `released`: the step inside the backward
    (trainer/optim/release.py), which optimi's AdamW is told of; torchao's and torch's need no flag."""
    hyper = adamw_hyperparameters(cfg)
    if optimizer == "adamw4bit":
        from torchao.optim import AdamW4bit
        optimizer = AdamW4bit(groups, **hyper, bf16_stochastic_round=True)
        keep_in_plain_tensors(optimizer)  # its checkpoints hold no tensor subclass (trainer/optim/quantized_states.py)
        return optimizer
    if master_weights == "bf16_kahan":
        from optimi import AdamW
        return AdamW(groups, **hyper, kahan_sum=True, foreach=False, gradient_release=released)
    if master_weights == "bf16_sr":
        from torchao.optim import _AdamW
        return _AdamW(groups, **hyper, bf16_stochastic_round=True)
    import torch
    return torch.optim.AdamW(groups, **hyper, foreach=False)
