"""Export a training run as a model `transformers` (or `peft`) loads, and check that it reproduces the run.

`export(out_dir, export_dir, dtype, adapter_only)`:
- full runs: the latest checkpoint's weights (ZeRO shards consolidated by DeepSpeed's zero_to_fp32);
- lora runs: the adapters folded into the base weights (peft's merge_and_unload);
- qlora runs: qlora_base='original' (the default) folds the adapters into the base reloaded unquantized from
  the original weights; 'dequantized' into the 4-bit weights the run trained on, dequantized (bitsandbytes'
  dequantize_4bit): the model as trained, checked against the 4-bit model with its adapters;
- PiSSA/OLoRA runs (lora_init): the base is the rest of each weight after the decomposition the adapters
  started from, rebuilt exactly as training built it, so the merged model is the trained one;
- adapter_only: a peft adapter directory (adapter_config.json, adapter_model.safetensors) for
  `PeftModel.from_pretrained(base, dir)` on the original base; PiSSA/OLoRA adapters are converted for it by
  peft (save_pretrained's path_initial_model_for_weight_conversion: rank 2r, the trained adapters beside the
  negated initial ones);
- a nanoGPT out_dir (or ckpt.pt): its model as transformers' GPT-2 (trainer/model/nanogpt.py).
Every export is the same three steps, after `refusals` has turned down what it cannot honour:
1. reference_of: the trained model rebuilt from the checkpoint, and its logits on a fixed batch;
2. a write (_write_model, _write_adapters) into a temporary folder next to export_dir, reloaded from disk
   the way a user loads it;
3. check_parity: the maximum absolute difference of the export's logits from the reference's. Only if that
   is within tolerance is the folder renamed to export_dir; otherwise it is removed and the command fails
   with one line.
"""
import functools
import gc
import importlib.util
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import ADAPTER_MODES
from trainer.data.tokenizer import gpt2_vocab_and_merges, tokenizer_kind
from trainer.data.tokens import dataset_dir
from trainer.errors import UserError
from trainer.lock import FolderLock
from trainer.model import nanogpt
from trainer.model.gpt2 import TORCH_DTYPES, load_pretrained
from trainer.os_errors import refusal_in, with_path
from trainer.run import checkpoint
from trainer.run.run_dir import RunDir
from trainer.run.weights import adapter_model, adapter_state_dict, load_adapter_run
from trainer.tools import gguf_export
from trainer.tools.loading import dequantized_base, load_nanogpt, load_run
from trainer.units import format_bytes

# Parity tolerance, relative to the largest reference logit (at least 1): the float rounding a merge
# or a cast to the export dtype can cause, far below any real mismatch (a wrong layout or a missing
# adapter moves logits by whole units).
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PARITY_BATCH = (2, 64)  # sequences x tokens (cropped to the model's block size)
PARITY_SEED = 0
QLORA_BASES = ("original", "dequantized")  # what a QLoRA run's adapters are merged into (docs/lora.md)
GGUF_TYPES = ("f32", "f16", "q8_0")  # --format=gguf's --gguf_type (docs/export.md)


class ParityError(UserError):
    """The exported model does not reproduce the trained one."""


def parity_batch(vocab_limit, block_size):
    """Fixed token ids: the same batch for every export of every run."""
    gen = torch.Generator().manual_seed(PARITY_SEED)
    rows, cols = PARITY_BATCH
    return torch.randint(0, vocab_limit, (rows, min(cols, block_size)), generator=gen)


@torch.no_grad()
def logits_of(model, idx):
    return model(input_ids=idx).logits.float()


def max_abs_diff(a, b):
    return float((a - b).abs().max())


def tolerance_for(reference, dtype, override=None):
    if override is not None:
        return override
    return RELATIVE_TOLERANCE[dtype] * max(1.0, float(reference.abs().max()))


def base_source(cfg):
    """Where the base weights came from, as a loadable name: a hub name or an absolute directory."""
    init_from = cfg.init_from
    return str(Path(init_from).resolve()) if Path(init_from).is_dir() else init_from


def _prepare_tmp(export_dir):
    export_dir = Path(export_dir)
    if export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
        raise UserError(f"export_dir {export_dir} already exists and is not empty; choose another --export_dir "
                        f"or remove it first")
    tmp = export_dir.parent / f".tmp-export-{export_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp, export_dir):
    export_dir = Path(export_dir)
    if export_dir.exists():
        export_dir.rmdir()  # checked empty above
    tmp.rename(export_dir)


def write_tokenizer(meta, folder):
    """GPT-2 BPE runs get the tokenizer files too (the same encoder.json / vocab.bpe the trainer uses);
    other runs (characters) get the dataset's meta.pkl, which sample.py and eval.py read."""
    if meta.get("tokenizer") != "gpt2":
        with open(Path(folder) / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)
        return False

    from transformers import GPT2TokenizerFast

    vocab, merges = gpt2_vocab_and_merges()
    GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]).save_pretrained(folder)
    return True


def saving_into(folder, save):
    """save(); an OS refusal on the way (safetensors says only "os error 28") is raised naming the folder."""
    try:
        return save()
    except Exception as exc:
        refused = refusal_in(exc)
        if refused is None:
            raise
        raise with_path(refused, folder) from None


def _save_merged(model, folder, dtype):
    """A plain GPT2LMHeadModel in safetensors with config.json and generation_config.json."""
    model = model.to(TORCH_DTYPES[dtype])
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True  # the trainer turns the KV cache off; generation wants it
    saving_into(folder, lambda: model.save_pretrained(folder, safe_serialization=True))
    if not (Path(folder) / "generation_config.json").is_file():
        from transformers import GenerationConfig
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def _save_converted(model, out_dir, folder, dtype):
    """Save PiSSA/OLoRA adapters as plain LoRA for the original base, through peft's conversion: the run's
    adapters as they started (rebuilt: the same decomposition of the same weights) are saved first, then
    save_pretrained(path_initial_model_for_weight_conversion=...) writes [A | A0] and [B | -B0] at rank 2r,
    whose product is the trained change of each weight, B A - B0 A0."""
    import tempfile
    import warnings
    with tempfile.TemporaryDirectory(dir=Path(folder).parent, prefix=".initial-adapters-") as scratch:
        initial = adapter_model(out_dir, quantized=False).to(TORCH_DTYPES[dtype])
        saving_into(scratch, functools.partial(initial.save_pretrained, Path(scratch) / "initial",
                                               safe_serialization=True, save_embedding_layers=False))
        del initial
        gc.collect()
        with warnings.catch_warnings():  # peft warns that PiSSA/OLoRA adapters should not be combined: it is
            warnings.simplefilter("ignore")  # loading the initial adapter beside the trained one to convert it
            saving_into(folder, lambda: model.save_pretrained(
                folder, safe_serialization=True, save_embedding_layers=False,
                path_initial_model_for_weight_conversion=str(Path(scratch) / "initial")))


def _check_run(out_dir):
    out_dir = Path(out_dir)
    if not RunDir(out_dir).is_run():
        raise UserError(f"{out_dir} is not a training run (no config.json and model_config.json); "
                        f"pass the --out_dir of a run")
    return checkpoint.latest_tag_or_error(out_dir)


def describe_adapters(cfg):
    """' (r=8, alpha=16, targets c_attn, c_proj, c_fc, DoRA, init pissa)'."""
    variants = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if getattr(cfg, key)]
    if cfg.lora_init != "default":
        variants.append(f"init {cfg.lora_init}")
    if cfg.loraplus_lr_ratio != 1:
        variants.append(f"LoRA+ ratio {cfg.loraplus_lr_ratio:g}")
    return (f" (r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets {', '.join(cfg.lora_targets)}"
            + "".join(f", {v}" for v in variants) + ")")


@dataclass
class Source:
    """What an export reads: a training run (its latest checkpoint) or a nanoGPT checkpoint (mode 'nanogpt')."""
    out_dir: Path
    mode: str
    meta: dict
    cfg: dict | None = None
    tag: str | None = None
    ckpt: Path | None = None


@dataclass
class Reference:
    """Step 1's result: the model to write (adapters not merged yet), the fixed batch, and the logits the
    export must reproduce on it."""
    model: torch.nn.Module
    idx: torch.Tensor
    logits: torch.Tensor
    trained: str  # what the logits are of, in the parity line
    gap: float | None = None  # a QLoRA run's quantization gap: the other qlora_base's difference
    n_adapted: int = 0  # layers with adapters


def refusals(out_dir, dtype, adapter_only, qlora_base, gguf_type=None):
    """Every input the export cannot honour, refused before anything is read or written; the Source otherwise.
    gguf_type: None for a transformers export, else the GGUF file's type."""
    if dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype={dtype}: choose fp32, bf16 or fp16")
    if qlora_base not in QLORA_BASES:
        raise UserError(f"--qlora_base={qlora_base}: choose original or dequantized")
    if gguf_type is not None:
        _gguf_refusals(dtype, adapter_only, gguf_type)
    out_dir = Path(out_dir)
    ckpt = nanogpt.checkpoint_path(out_dir)
    if ckpt is not None and not RunDir(out_dir).is_run():
        if adapter_only:
            raise UserError(f"{out_dir} is a nanoGPT checkpoint: a whole model, without adapters; export it "
                            f"without --adapter_only")
        source = Source(out_dir, "nanogpt", nanogpt.find_meta(ckpt)[0], ckpt=ckpt)
        return _gguf_tokenizer_refusal(source) if gguf_type is not None else source
    tag = _check_run(out_dir)
    run_dir = RunDir(out_dir)
    cfg, mode, meta = run_dir.config(), run_dir.mode(), run_dir.meta()
    if adapter_only and mode not in ADAPTER_MODES:
        raise UserError(f"--adapter_only needs a lora or qlora run, but {out_dir} trained in {mode} mode; "
                        f"export it without --adapter_only")
    if adapter_only and not cfg.bias:
        raise UserError(f"{out_dir} trained with bias=False (biases zeroed), which an adapter directory cannot "
                        f"carry; export the merged model without --adapter_only")
    if qlora_base == "dequantized" and mode != "qlora":
        raise UserError(f"--qlora_base=dequantized merges into a QLoRA run's 4-bit base, but {out_dir} trained in "
                        f"{mode} mode; leave --qlora_base out")
    if qlora_base == "dequantized" and adapter_only:
        raise UserError("--adapter_only writes the adapters without a base, so --qlora_base has nothing to choose; "
                        "load them on a 4-bit base (BitsAndBytesConfig nf4) for the model as trained, or export "
                        "the merged model with --qlora_base=dequantized")
    if adapter_only and cfg.use_dora and cfg.lora_init != "default":
        raise UserError(f"{out_dir} trained DoRA adapters started by lora_init={cfg.lora_init}, which peft cannot "
                        f"convert for the original base (the conversion drops DoRA's magnitudes); export the merged "
                        f"model without --adapter_only")
    if adapter_only and cfg.init_from == "scratch":
        raise UserError(f"{out_dir} trained adapters on a from-scratch base, which exists nowhere on disk for "
                        f"PeftModel.from_pretrained(base, ...); export the merged model without --adapter_only")
    if adapter_only and nanogpt.checkpoint_path(cfg.init_from) is not None:
        raise UserError(f"{out_dir} trained adapters on the nanoGPT checkpoint {cfg.init_from}, which "
                        f"PeftModel.from_pretrained cannot load as a base; export the merged model without "
                        f"--adapter_only (or export the checkpoint with merge_adapter.py and train the adapters on "
                        f"that)")
    source = Source(out_dir, mode, meta, cfg=cfg, tag=tag)
    return _gguf_tokenizer_refusal(source) if gguf_type is not None else source


def _gguf_refusals(dtype, adapter_only, gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type={gguf_type}: choose {', '.join(GGUF_TYPES[:-1])} or {GGUF_TYPES[-1]}")
    if adapter_only:
        raise UserError("--format=gguf writes the merged model (llama.cpp's adapter files are not written); "
                        "leave --adapter_only out, or export the peft adapter directory without --format=gguf")
    if dtype != "fp32":
        raise UserError(f"--dtype={dtype} is the dtype of a transformers export; a GGUF file's type is "
                        f"--gguf_type (f32, f16 or q8_0): leave --dtype out")
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("--format=gguf checks the file with llama.cpp, and the llama-cpp-python package is not "
                        "installed; install it with bash launch/setup_env.sh (pip install -r requirements.txt)")


def _gguf_tokenizer_refusal(source):
    """A GGUF file carries GPT-2's BPE tokenizer only: a character-level run's vocabulary has no place in it."""
    if tokenizer_kind(source.meta) != "gpt2":
        raise UserError(f"{source.out_dir} is a character-level model (its {source.meta['vocab_size']} characters "
                        f"are in meta.pkl), and a GGUF file carries only a tokenizer llama.cpp knows, such as "
                        f"GPT-2's BPE; export it without --format=gguf and sample it with launch/sample.py, or "
                        f"train on GPT-2 BPE data (data/shakespeare/prepare.py) for llama.cpp")
    return source


def export(out_dir, export_dir, dtype="fp32", adapter_only=False, tolerance=None, log=print, qlora_base="original",
           gguf_type=None):
    """Write the export, check its parity; returns {'max_abs_diff', 'tolerance', ...} (raises ParityError).
    gguf_type (f32, f16, q8_0): one GGUF file for llama.cpp and an Ollama Modelfile instead of a transformers
    model (trainer/tools/gguf_export.py)."""
    source = refusals(out_dir, dtype, adapter_only, qlora_base, gguf_type)

    def write_and_check(folder):
        reference = reference_of(source, qlora_base, log)
        if gguf_type is not None:
            out, how, criteria = _write_gguf(source, reference, folder, gguf_type, qlora_base, log)
            tol = gguf_tolerance(reference.logits, gguf_type, tolerance)
            return check_parity(source, reference, out, how, gguf_type, tol, log, qlora_base, criteria)
        write = _write_adapters if adapter_only else _write_model
        exported, how = write(source, reference, folder, dtype, qlora_base, log)
        out = logits_of(exported, reference.idx)
        del exported
        return check_parity(source, reference, out, how, dtype, tolerance_for(reference.logits, dtype, tolerance),
                            log, qlora_base)

    return _into_export_dir(export_dir, write_and_check, log)


def _into_export_dir(export_dir, write, log):
    """write(folder) into a temporary folder beside export_dir, renamed to it once complete and removed on any
    failure; one export into export_dir at a time (the lock file lies beside it: export_dir must be empty)."""
    export_dir = Path(export_dir)
    with FolderLock(export_dir, "an export", "choose another --export_dir",
                    lock_file=export_dir.parent / f".{export_dir.name}.lock"):
        tmp = _prepare_tmp(export_dir)
        try:
            result = write(tmp)
            _finish(tmp, export_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"exported to {export_dir}")
    return result


# 1. the reference: the trained model, rebuilt from the checkpoint, and its logits on the fixed batch

def reference_of(source, qlora_base, log):
    if source.mode == "nanogpt":
        iter_num, best = nanogpt.training_state(source.ckpt)
        log(f"nanoGPT checkpoint {source.ckpt}: iteration {iter_num}, best val loss {best:.4f}")
        loaded = load_nanogpt(source.ckpt)
        idx = parity_batch(loaded.vocab_limit, loaded.block_size)
        return Reference(loaded.lm, idx, logits_of(loaded.lm, idx), "the nanoGPT model")
    out_dir, cfg, mode = source.out_dir, source.cfg, source.mode
    log(f"run {out_dir}: {mode} mode{describe_adapters(cfg) if mode in ADAPTER_MODES else ''}, checkpoint "
        f"{source.tag}, base {base_source(cfg) if mode in ADAPTER_MODES else 'in the checkpoint'}")
    if mode == "full":
        model = load_run(out_dir, source.tag).lm
        idx = parity_batch(source.meta["vocab_size"], model.config.n_positions)
        return Reference(model, idx, logits_of(model, idx), "the trained model")
    weights = adapter_state_dict(out_dir, source.tag)
    if mode == "qlora":
        quantized = load_adapter_run(out_dir, quantized=True, weights=weights)
        idx = parity_batch(source.meta["vocab_size"], quantized.config.n_positions)
        trained_4bit = logits_of(quantized, idx)
        del quantized
        gc.collect()
    model = load_adapter_run(out_dir, quantized=False, weights=weights)  # on the unquantized original weights
    n_adapted = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    idx = parity_batch(source.meta["vocab_size"], model.config.n_positions)
    reference = logits_of(model, idx)
    if mode != "qlora":
        return Reference(model, idx, reference, "the trained model", n_adapted=n_adapted)
    gap = max_abs_diff(reference, trained_4bit)
    if qlora_base == "original":
        return Reference(model, idx, reference, "base + adapter unquantized (fp32)", gap, n_adapted)
    del model  # the same adapters on the 4-bit weights as trained, dequantized
    gc.collect()
    model = load_adapter_run(out_dir, quantized=False, weights=weights, base=dequantized_base(out_dir))
    return Reference(model, idx, trained_4bit, "the 4-bit model as trained", gap, n_adapted)


# 2. the write: a merged transformers model, or a peft adapter directory

def merged_model(source, reference, qlora_base, log):
    """The reference model with its adapters folded in (a run's or a checkpoint's model as it is otherwise)."""
    model = reference.model
    reference.model = None  # merged in place: the reference's own copy is gone
    if source.mode not in ADAPTER_MODES:
        return model
    model = model.merge_and_unload()
    into = {"original": "unquantized original weights",
            "dequantized": "dequantized 4-bit weights the run trained on (bitsandbytes' dequantize_4bit)"}
    into = into[qlora_base] if source.mode == "qlora" else "base weights"
    if source.cfg.lora_init != "default":
        into += (f" (the rest of each weight after the {source.cfg.lora_init} decomposition the adapters "
                 f"started from)")
    log(f"merged the adapters of {reference.n_adapted} layers into the {into}")
    return model


def _write_model(source, reference, folder, dtype, qlora_base, log):
    from transformers import AutoModelForCausalLM

    _save_merged(merged_model(source, reference, qlora_base, log), folder, dtype)
    gc.collect()
    tokenizer = saving_into(folder, lambda: write_tokenizer(source.meta, folder))
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    vocab = "the GPT-2 tokenizer" if tokenizer else "the characters' meta.pkl"
    if source.mode == "nanogpt":
        what = f"exact GELU, with {vocab}"
    else:
        size = format_bytes(sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors")))
        what = f"{size} of safetensors, with {vocab}"
    log(f"saved a transformers model ({dtype}, vocab {reference.logits.size(-1):,}, {what}): {files}")
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=TORCH_DTYPES[dtype]).eval()
    return exported, "AutoModelForCausalLM.from_pretrained(export)"


def _write_adapters(source, reference, folder, dtype, qlora_base, log):
    from peft import PeftModel

    cfg, model = source.cfg, reference.model
    reference.model = None
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = base_source(cfg)
    peft_config.inference_mode = True
    model = model.to(TORCH_DTYPES[dtype])
    if cfg.lora_init == "default":
        saving_into(folder, lambda: model.save_pretrained(folder, safe_serialization=True,
                                                          save_embedding_layers=False))
        converted = ""
    else:
        _save_converted(model, source.out_dir, folder, dtype)
        converted = (f"; {cfg.lora_init} adapters converted for the original base by peft: rank "
                     f"{2 * cfg.lora_r}, the trained adapters beside the negated initial ones")
    del model
    gc.collect()
    log(f"saved the adapters of {reference.n_adapted} layers ({dtype}) as a peft adapter directory "
        f"(base_model_name_or_path {base_source(cfg)}){converted}")
    base = load_pretrained(base_source(cfg), 0.0)
    return PeftModel.from_pretrained(base, str(folder)).eval(), "PeftModel.from_pretrained(base, export)"


def _write_gguf(source, reference, folder, gguf_type, qlora_base, log):
    """The merged model as one GGUF file and an Ollama Modelfile, loaded back by llama.cpp: its tokenization of
    a fixed text must be tiktoken's; returns its logits on the fixed batch and, for q8_0, the criteria it is
    checked by (next-token agreement, perplexity on val text against the trained model's)."""
    model = merged_model(source, reference, qlora_base, log)
    config = model.config
    criteria = []
    if gguf_type == "q8_0":
        x, y, where = gguf_export.val_windows(val_folder(source), source.meta, config.n_positions)
        trained_ppl = gguf_export.perplexity(logits_of(model, x), y)
    path = folder / gguf_export.GGUF_FILE
    counts = saving_into(folder, lambda: gguf_export.write_gguf(model, path, gguf_type, source.out_dir.name))
    del model
    gc.collect()
    template = source.meta.get("template")
    saving_into(folder, lambda: gguf_export.write_modelfile(folder, config.n_positions, template))
    log(f"saved {gguf_export.GGUF_FILE} ({gguf_type}: {', '.join(f'{n} {t}' for t, n in counts.items())} tensors, "
        f"{format_bytes(path.stat().st_size)}, GPT-2 BPE tokenizer, context {config.n_positions}) and an Ollama "
        f"{gguf_export.MODELFILE} ({'template ' + template if template else 'no prompt template'})")
    llama = gguf_export.LlamaCppModel(path, config.n_positions)
    try:
        mismatch, n = gguf_export.tokenizer_mismatch(llama)
        verdict = "are tiktoken's: ok" if mismatch is None else f"differ from tiktoken's at {mismatch}: FAILED"
        log(f"tokenizer: llama.cpp's tokens of a fixed text of {n} tokens {verdict}")
        if mismatch is not None:
            raise ParityError(f"llama.cpp tokenizes the exported file's vocabulary differently from tiktoken "
                              f"({mismatch}); nothing was written to the export_dir")
        out = llama.logits(reference.idx)
        if gguf_type == "q8_0":
            ppl = gguf_export.perplexity(llama.logits(x), y)
            criteria = gguf_export.quantized_criteria(out, reference.logits, ppl, trained_ppl, f"{x.size(0)}x"
                                                      f"{x.size(1)} tokens of val text ({where})")
    finally:
        llama.close()
    return out, f"llama.cpp({gguf_export.GGUF_FILE})", criteria


def val_folder(source):
    """The dataset folder whose val.bin the run (or checkpoint) evaluated on, or None."""
    if source.mode != "nanogpt":
        return dataset_dir(source.cfg)
    return next((f for f in nanogpt.meta_candidates(source.ckpt) if (f / "val.bin").is_file()), None)


def gguf_tolerance(reference, gguf_type, override=None):
    """f32 and f16 by the largest logit difference; q8_0 by its criteria (None), unless --tolerance is given."""
    if override is not None or gguf_type == "q8_0":
        return override
    return gguf_export.RELATIVE_TOLERANCE[gguf_type] * max(1.0, float(reference.abs().max()))


# 3. parity: the export's logits on the fixed batch against the reference's

def check_parity(source, reference, out, how, dtype, tol, log, qlora_base, criteria=()):
    """Print the parity line (and a QLoRA run's quantization gap, a quantized file's criteria); raise
    ParityError above the tolerance (tol None: the criteria decide) or when a criterion fails."""
    idx, gap = reference.idx, reference.gap
    diff = max_abs_diff(out, reference.logits)
    within = tol is None or diff <= tol
    limit = f"tolerance {tol:.1e}" if tol is not None else "tolerance: none for q8_0, checked by the lines below"
    log(f"parity on a fixed batch of {idx.size(0)}x{idx.size(1)} tokens: max |logits({how}) - "
        f"logits({reference.trained})| = {diff:.3e} ({limit}): {'ok' if within else 'FAILED'}")
    for line, passed in criteria:
        log(f"parity: {line}: {'ok' if passed else 'FAILED'}")
    if gap is not None and qlora_base == "original":
        log(f"parity vs the 4-bit model as trained: max |logits| difference = {gap:.3e} (the nf4 quantization "
            f"gap: expected, not checked; --qlora_base=dequantized exports the model as trained)")
    elif gap is not None:
        log(f"vs base + adapter unquantized (--qlora_base=original): max |logits| difference = {gap:.3e} (the nf4 "
            f"quantization gap: what the other export would differ by, not checked)")
    model = "the nanoGPT model" if source.mode == "nanogpt" else "the trained model"
    if not within:
        raise ParityError(f"parity check failed: the export differs from {model} by {diff:.3e} "
                          f"(tolerance {tol:.1e}); nothing was written to the export_dir")
    failed = [line for line, passed in criteria if not passed]
    if failed:
        raise ParityError(f"parity check failed: the export of {model} has {failed[0]}; nothing was written to "
                          f"the export_dir")
    return {"mode": source.mode, "dtype": dtype, "max_abs_diff": diff, "tolerance": tol, "quantization_gap": gap,
            "qlora_base": qlora_base if source.mode == "qlora" else None}
