"""A checkpoint's full fp32 weights, read offline (no engine, no accelerator): DeepSpeed's zero_to_fp32 for
ZeRO shards, a reader of BF16_Optimizer's shards (which zero_to_fp32 refuses), the module file for ZeRO-0.
trainer/run/weights.py builds a finished run's model from them."""
import re

import torch

from trainer.errors import UserError
from trainer.plan.memory import saved_deepspeed_path
from trainer.run import safe_load
from trainer.run.checkpoint import checkpoint_dir, corrupt_message, latest_tag_or_error, read_info


def strip_prefix(state_dict, prefix="lm."):
    """State dicts saved from LMWithLoss -> keys of the bare HF model."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def consolidated_state_dict(out_dir, tag=None):
    """A checkpoint's full fp32 weights keyed as the bare HF model, ZeRO shards merged by DeepSpeed's own
    zero_to_fp32 (under ZeRO-3 the module file holds empty tensors). tag: one already verified, else the
    newest that verifies (latest_tag_or_error)."""
    if tag is None:
        tag = latest_tag_or_error(out_dir)  # verified by content, its torch files checked to be data
    else:  # zero_to_fp32 reads with weights_only=False: the files of a tag the caller chose are checked here
        problem = safe_load.check_folder(checkpoint_dir(out_dir) / tag)
        if problem:
            raise UserError(corrupt_message(out_dir, tag, problem))
    folder = checkpoint_dir(out_dir) / tag
    info = read_info(out_dir, tag)
    if saved_deepspeed_path(info).optimizer == "bf16_optimizer":
        state = bf16_optimizer_state_dict(folder)
    elif list(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(out_dir)), tag=tag)
    else:  # ZeRO stage 0: the module's weights are saved whole by rank 0
        state = safe_load.load(folder / "mp_rank_00_model_states.pt")["module"]
    return {k: v.float() for k, v in strip_prefix(state).items()}


def bf16_optimizer_state_dict(folder):
    """The fp32 master weights of a bf16 ZeRO-0 checkpoint. That plan runs DeepSpeed's BF16_Optimizer
    (trainer/plan/memory.deepspeed_path), whose files zero_to_fp32 refuses ("is not
    a zero checkpoint"). Each rank's file holds a slice of every parameter group flattened in the order of the
    model file's param_shapes (padding at the end); frozen weights and buffers are the module's own (an adapter
    checkpoint has none), and tied weights (lm_head) point to the tensor they share."""
    model = safe_load.load(folder / "mp_rank_00_model_states.pt")
    files = sorted(folder.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"_pp_rank_(\d+)_", f.name)[1]))  # in rank order
    slices = [safe_load.load(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"] for f in files]
    state = dict(model["module"])
    for group, shapes in enumerate(model["param_shapes"]):
        flat, start = torch.cat([rank_slices[group] for rank_slices in slices]), 0
        for name, shape in shapes.items():
            state[name] = flat[start:start + shape.numel()].view(shape)
            start += shape.numel()
    for alias, name in model.get("shared_params", {}).items():
        if name in state:  # an adapter checkpoint leaves the frozen base (and its ties) out
            state[alias] = state[name]
    return state
