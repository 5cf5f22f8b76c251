"""torchao's 4-bit AdamW moments (optimizer=adamw4bit) in checkpoints, as the plain tensors they are made of.

Each quantized moment is torchao 0.18's OptimState4bit, a tensor subclass over three plain tensors (packed uint8
codes, an fp32 scale per block, a 16-entry fp32 map) and two attributes (signed, shape). DeepSpeed 0.19.8 loads
its optimizer files with a callable map_location, which torch cannot apply to a wrapper subclass
("Callable map_location not supported with _rebuild_wrapper_subclass"), and weights_only loading would have to
admit the class. So the optimizer's state_dict holds, in place of each such moment, a dict of those plain
tensors and attributes (QUANTIZED marks it); load_state_dict rebuilds the subclass from them before torch's
own casting, which for OptimState4bit changes only its appearance dtype and device (subclass_4bit's
aten._to_copy). The codes and scales are saved bit for bit: a resumed run's moments are the saved ones.
Nothing in the file names a class: the one rebuilt is fixed here.
"""
QUANTIZED = "torchao_optim_state_4bit"
_DTYPES = ("float32", "bfloat16", "float16")  # (torch imported only when a state is rebuilt: --plan stays light)


def keep_in_plain_tensors(optimizer):
    """Register the two hooks on a torchao low-bit optimizer (AdamW4bit)."""
    optimizer.register_state_dict_post_hook(_packed)
    optimizer.register_load_state_dict_pre_hook(_rebuilt)


def _packed(optimizer, state_dict):
    from torchao.optim.subclass_4bit import OptimState4bit
    # new dicts: state_dict()'s per-tensor dicts are the optimizer's live ones
    state_dict["state"] = {
        index: {name: _pack(value) if isinstance(value, OptimState4bit) else value for name, value in state.items()}
        for index, state in state_dict["state"].items()}
    return state_dict


def _pack(moment):
    return {QUANTIZED: True, "codes": moment.codes, "scale": moment.scale, "qmap": moment.qmap,
            "signed": bool(moment.signed), "shape": list(moment.shape),
            "dtype": str(moment.dtype).removeprefix("torch.")}


def _rebuilt(optimizer, state_dict):
    state_dict = dict(state_dict)
    state_dict["state"] = {
        index: {name: _unpack(value) if isinstance(value, dict) and value.get(QUANTIZED) else value
                for name, value in state.items()}
        for index, state in state_dict["state"].items()}
    return state_dict


def _unpack(packed):
    import torch
    from torchao.optim.subclass_4bit import OptimState4bit
    if packed["dtype"] not in _DTYPES:
        raise ValueError(f"a 4-bit optimizer state of dtype {packed['dtype']!r} (expected one of {sorted(_DTYPES)})")
    return OptimState4bit(packed["codes"], packed["scale"], packed["qmap"], bool(packed["signed"]),
                          tuple(int(n) for n in packed["shape"]), dtype=getattr(torch, packed["dtype"]))
