"""nanoGPT's checkpoints (`out_dir/ckpt.pt` of its train.py) read as transformers' GPT-2.

A nanoGPT checkpoint is a torch.save'd dict: `model` (the GPT's state dict; names prefixed `_orig_mod.`
when the model was compiled), `model_args` (n_layer, n_head, n_embd, block_size, bias, vocab_size,
dropout), `iter_num`, `best_val_loss`, `config` (its train.py's settings, `dataset` among them) and
`optimizer`. Its GPT is GPT-2's architecture with the same parameter names, except that:
- the four projections are nn.Linear, weights (out, in), where transformers' GPT-2 has Conv1D (in, out);
- the MLP's activation is nn.GELU(), the exact (erf) GELU, not GPT-2's tanh approximation;
- with bias=False, Linears and LayerNorms have no bias (the same function as zero biases);
- a model trained on GPT-2 BPE has vocab_size 50304 (50257 padded), a character model its dataset's
  size, whose characters are in the dataset's meta.pkl (nanoGPT keeps it in data/<dataset>/).
trainer/model/gpt2.py builds the transformers model from what this module reads (gpt2_from_nanogpt);
tools/loading.load_nanogpt adds the tokenizer and run config that sample, eval and export use.
"""
import functools
from pathlib import Path

from trainer.data.tokenizer import GPT2_VOCAB_SIZE
from trainer.data.tokens import read_meta
from trainer.errors import UserError

CHECKPOINT = "ckpt.pt"
ACTIVATION = "gelu"  # transformers' name of the exact GELU, nanoGPT's nn.GELU()
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper, saved into the names of a compiled model
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
LINEAR_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
CAUSAL_MASK = ".attn.bias"  # the mask buffer of nanoGPT's attention without flash attention: not a weight


def checkpoint_path(source):
    """The ckpt.pt a source names (a nanoGPT out_dir, or the file itself), or None."""
    if not isinstance(source, (str, Path)) or source in ("scratch", "resume"):
        return None
    path = Path(source)
    if path.is_dir() and (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    if path.is_file() and path.suffix == ".pt":
        return path
    return None


@functools.cache
def read_checkpoint(path):
    """The checkpoint's dict, its tensors memory-mapped (the optimizer's states are never read)."""
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or objects weights_only refuses
        raise UserError(f"{path} could not be read as a nanoGPT checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); point init_from at the ckpt.pt its "
                        f"train.py saved, or its out_dir") from None
    args = ckpt.get("model_args") if isinstance(ckpt, dict) else None
    if not isinstance(args, dict) or "model" not in ckpt or any(k not in args for k in MODEL_ARGS):
        raise UserError(f"{path} is not a nanoGPT checkpoint (a dict with 'model' and 'model_args' holding "
                        f"{', '.join(MODEL_ARGS)}); point init_from at the ckpt.pt nanoGPT's train.py saved")
    return ckpt


def model_args(path):
    return read_checkpoint(path)["model_args"]


def hf_state_dict(path):
    """The checkpoint's weights named and laid out as transformers' GPT2LMHeadModel holds them."""
    state = {}
    for name, tensor in read_checkpoint(path)["model"].items():
        name = name.removeprefix(COMPILED_PREFIX)
        if name.endswith(CAUSAL_MASK):
            continue
        state[name] = tensor.t() if name.endswith(LINEAR_WEIGHTS) else tensor
    return state


def training_state(path):
    """(iteration, best val loss) the checkpoint was saved at, for the console."""
    ckpt = read_checkpoint(path)
    return int(ckpt.get("iter_num", 0)), float(ckpt.get("best_val_loss", float("nan")))


def dataset(path):
    """The dataset nanoGPT trained on (its config's `dataset`), or None."""
    config = read_checkpoint(path).get("config")
    return config.get("dataset") if isinstance(config, dict) else None


def meta_candidates(path, data_dir="data"):
    """Where a checkpoint's vocabulary may be: beside ckpt.pt, then <data_dir>/<dataset>/ (the current
    directory's data/ unless a run names its data_dir), then data/<dataset>/ in the folder above the
    out_dir (nanoGPT's clone, where its train.py ran)."""
    path = Path(path)
    folders = [path.parent]
    name = dataset(path)
    if name:
        folders += [Path(data_dir) / name, path.parent.parent / "data" / name]
    return list(dict.fromkeys(folders))


def find_meta(path, data_dir="data"):
    """(meta, folder): the checkpoint's vocabulary as a dataset's meta.pkl dict, and the folder it came
    from (None for GPT-2 BPE, which needs no file)."""
    for folder in meta_candidates(path, data_dir):
        if (folder / "meta.pkl").is_file():
            return read_meta(folder), folder
    vocab = model_args(path)["vocab_size"]
    if vocab < GPT2_VOCAB_SIZE:  # a character model: its characters are in its dataset's meta.pkl
        where = ", ".join(str(f / "meta.pkl") for f in meta_candidates(path, data_dir))
        raise UserError(f"{path} is a character model (vocab_size {vocab}) and its vocabulary, the meta.pkl of "
                        f"its dataset {dataset(path)!r}, is in none of {where}; copy that meta.pkl next to "
                        f"{Path(path).name} or run from nanoGPT's folder")
    return {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}, None


def describe(path):
    """One line: what a run starting from this checkpoint takes from it."""
    iter_num, best = training_state(path)
    args = model_args(path)
    return (f"init_from={str(path)!r}: nanoGPT's checkpoint of iteration {iter_num} (best val loss {best:.4f}), "
            f"{args['n_layer']} layers, {args['n_head']} heads, {args['n_embd']} wide, vocab {args['vocab_size']}, "
            f"bias={args['bias']}, exact GELU; its weights only: the optimizer starts fresh at iteration 0")
