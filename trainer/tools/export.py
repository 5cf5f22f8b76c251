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
The export is written to a temporary folder next to export_dir, reloaded from disk the way a user loads
it, and compared with the trained model rebuilt from the checkpoint on a fixed batch (the maximum
absolute difference of the logits). Only if that is within tolerance is it renamed to export_dir;
otherwise it is removed and the command fails with one line.
"""
import functools
import gc
import json
import pickle
import shutil
from pathlib import Path

import torch

from trainer.config import ADAPTER_MODES
from trainer.data.tokenizer import gpt2_bpe_files
from trainer.errors import UserError
from trainer.lock import FolderLock
from trainer.model import nanogpt
from trainer.model.gpt2 import TORCH_DTYPES, load_pretrained
from trainer.os_errors import refusal_in, with_path
from trainer.run import checkpoint
from trainer.run.run_dir import RunDir
from trainer.run.weights import adapter_model, adapter_state_dict, load_adapter_run
from trainer.tools.loading import dequantized_base, load_nanogpt, load_run
from trainer.units import format_bytes

# Parity tolerance, relative to the largest reference logit (at least 1): the float rounding a merge
# or a cast to the export dtype can cause, far below any real mismatch (a wrong layout or a missing
# adapter moves logits by whole units).
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
PARITY_BATCH = (2, 64)  # sequences x tokens (cropped to the model's block size)
PARITY_SEED = 0
QLORA_BASES = ("original", "dequantized")  # what a QLoRA run's adapters are merged into (docs/lora.md)


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
    init_from = cfg["init_from"]
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

    data = gpt2_bpe_files()
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # after '#version: 0.2'
    merges = [tuple(line.split(" ")) for line in lines if line.strip()]
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)
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
    variants = [name for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if cfg[key]]
    if cfg["lora_init"] != "default":
        variants.append(f"init {cfg['lora_init']}")
    if cfg["loraplus_lr_ratio"] != 1:
        variants.append(f"LoRA+ ratio {cfg['loraplus_lr_ratio']:g}")
    return (f" (r={cfg['lora_r']}, alpha={cfg['lora_alpha']}, targets {', '.join(cfg['lora_targets'])}"
            + "".join(f", {v}" for v in variants) + ")")


def export(out_dir, export_dir, dtype="fp32", adapter_only=False, tolerance=None, log=print, qlora_base="original"):
    """Write the export, check its parity; returns {'max_abs_diff', 'tolerance', ...} (raises ParityError)."""
    if dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype={dtype}: choose fp32, bf16 or fp16")
    if qlora_base not in QLORA_BASES:
        raise UserError(f"--qlora_base={qlora_base}: choose original or dequantized")
    out_dir = Path(out_dir)
    ckpt = nanogpt.checkpoint_path(out_dir)
    if ckpt is not None and not RunDir(out_dir).is_run():
        if adapter_only:
            raise UserError(f"{out_dir} is a nanoGPT checkpoint: a whole model, without adapters; export it "
                            f"without --adapter_only")
        return _into_export_dir(export_dir, lambda tmp: _export_nanogpt(ckpt, tmp, dtype, tolerance, log), log)
    tag = _check_run(out_dir)
    run_dir = RunDir(out_dir)
    cfg, mode, meta = run_dir.config(), run_dir.mode(), run_dir.meta()
    if adapter_only and mode not in ADAPTER_MODES:
        raise UserError(f"--adapter_only needs a lora or qlora run, but {out_dir} trained in {mode} mode; "
                        f"export it without --adapter_only")
    if adapter_only and not cfg["bias"]:
        raise UserError(f"{out_dir} trained with bias=False (biases zeroed), which an adapter directory cannot "
                        f"carry; export the merged model without --adapter_only")
    if qlora_base == "dequantized" and mode != "qlora":
        raise UserError(f"--qlora_base=dequantized merges into a QLoRA run's 4-bit base, but {out_dir} trained in "
                        f"{mode} mode; leave --qlora_base out")
    if qlora_base == "dequantized" and adapter_only:
        raise UserError("--adapter_only writes the adapters without a base, so --qlora_base has nothing to choose; "
                        "load them on a 4-bit base (BitsAndBytesConfig nf4) for the model as trained, or export "
                        "the merged model with --qlora_base=dequantized")
    if adapter_only and cfg["use_dora"] and cfg["lora_init"] != "default":
        raise UserError(f"{out_dir} trained DoRA adapters started by lora_init={cfg['lora_init']}, which peft cannot "
                        f"convert for the original base (the conversion drops DoRA's magnitudes); export the merged "
                        f"model without --adapter_only")
    if adapter_only and cfg["init_from"] == "scratch":
        raise UserError(f"{out_dir} trained adapters on a from-scratch base, which exists nowhere on disk for "
                        f"PeftModel.from_pretrained(base, ...); export the merged model without --adapter_only")
    if adapter_only and nanogpt.checkpoint_path(cfg["init_from"]) is not None:
        raise UserError(f"{out_dir} trained adapters on the nanoGPT checkpoint {cfg['init_from']}, which "
                        f"PeftModel.from_pretrained cannot load as a base; export the merged model without "
                        f"--adapter_only (or export the checkpoint with merge_adapter.py and train the adapters on "
                        f"that)")
    return _into_export_dir(export_dir, lambda tmp: _export(out_dir, tmp, cfg, mode, meta, dtype, adapter_only,
                                                             tolerance, tag, log, qlora_base), log)


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


def _export(out_dir, folder, cfg, mode, meta, dtype, adapter_only, tolerance, tag, log, qlora_base):
    from transformers import AutoModelForCausalLM

    log(f"run {out_dir}: {mode} mode{describe_adapters(cfg) if mode in ADAPTER_MODES else ''}, checkpoint {tag}, "
        f"base {base_source(cfg) if mode in ADAPTER_MODES else 'in the checkpoint'}")
    result = {"mode": mode, "dtype": dtype}
    gap = None
    as_trained = mode != "qlora" or qlora_base == "dequantized"  # what the parity reference is

    # 1. the trained model, rebuilt from the checkpoint, and its logits on the fixed batch
    if mode == "full":
        loaded = load_run(out_dir, tag)
        model = loaded.lm
    else:
        weights = adapter_state_dict(out_dir, tag)
        if mode == "qlora":
            quantized = load_adapter_run(out_dir, quantized=True, weights=weights)
            idx = parity_batch(meta["vocab_size"], quantized.config.n_positions)
            trained_4bit = logits_of(quantized, idx)
            del quantized
            gc.collect()
        model = load_adapter_run(out_dir, quantized=False, weights=weights)  # on the unquantized original weights
    idx = parity_batch(meta["vocab_size"], model.config.n_positions)
    reference = logits_of(model, idx)
    if mode == "qlora":
        gap = max_abs_diff(reference, trained_4bit)
        if qlora_base == "dequantized":  # the same adapters on the 4-bit weights as trained, dequantized
            del model
            gc.collect()
            model = load_adapter_run(out_dir, quantized=False, weights=weights, base=dequantized_base(out_dir))
            reference = trained_4bit
        del trained_4bit

    # 2. write the export
    if adapter_only:
        peft_config = model.peft_config["default"]
        peft_config.base_model_name_or_path = base_source(cfg)
        peft_config.inference_mode = True
        model = model.to(TORCH_DTYPES[dtype])
        n_adapted = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
        if cfg["lora_init"] == "default":
            saving_into(folder, lambda: model.save_pretrained(folder, safe_serialization=True,
                                                              save_embedding_layers=False))
            converted = ""
        else:
            _save_converted(model, out_dir, folder, dtype)
            converted = (f"; {cfg['lora_init']} adapters converted for the original base by peft: rank "
                         f"{2 * cfg['lora_r']}, the trained adapters beside the negated initial ones")
        del model
        gc.collect()
        log(f"saved the adapters of {n_adapted} layers ({dtype}) as a peft adapter directory "
            f"(base_model_name_or_path {base_source(cfg)}){converted}")
        from peft import PeftModel
        base = load_pretrained(base_source(cfg), 0.0)
        exported = PeftModel.from_pretrained(base, str(folder)).eval()
        how = "PeftModel.from_pretrained(base, export)"
    else:
        if mode in ADAPTER_MODES:
            n_adapted = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
            model = model.merge_and_unload()
            into = {"original": "unquantized original weights",
                    "dequantized": "dequantized 4-bit weights the run trained on (bitsandbytes' dequantize_4bit)"}
            into = into[qlora_base] if mode == "qlora" else "base weights"
            if cfg["lora_init"] != "default":
                into += (f" (the rest of each weight after the {cfg['lora_init']} decomposition the adapters "
                         f"started from)")
            log(f"merged the adapters of {n_adapted} layers into the {into}")
        _save_merged(model, folder, dtype)
        del model
        gc.collect()
        tokenizer = saving_into(folder, lambda: write_tokenizer(meta, folder))
        files = sorted(p.name for p in folder.iterdir())
        size = format_bytes(sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors")))
        vocab = "the GPT-2 tokenizer" if tokenizer else "the characters' meta.pkl"
        log(f"saved a transformers model ({dtype}, vocab {reference.size(-1):,}, {size} of "
            f"safetensors, with {vocab}): {', '.join(files)}")
        exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=TORCH_DTYPES[dtype]).eval()
        how = "AutoModelForCausalLM.from_pretrained(export)"

    # 3. parity
    out = logits_of(exported, idx)
    del exported
    diff = max_abs_diff(out, reference)
    tol = tolerance_for(reference, dtype, tolerance)
    trained = {"full": "the trained model", "lora": "the trained model",
               "qlora": "the 4-bit model as trained" if as_trained else "base + adapter unquantized (fp32)"}[mode]
    log(f"parity on a fixed batch of {idx.size(0)}x{idx.size(1)} tokens: max |logits({how}) - logits({trained})| "
        f"= {diff:.3e} (tolerance {tol:.1e}): {'ok' if diff <= tol else 'FAILED'}")
    if gap is not None and not as_trained:
        log(f"parity vs the 4-bit model as trained: max |logits| difference = {gap:.3e} (the nf4 quantization "
            f"gap: expected, not checked; --qlora_base=dequantized exports the model as trained)")
    elif gap is not None:
        log(f"vs base + adapter unquantized (--qlora_base=original): max |logits| difference = {gap:.3e} (the nf4 "
            f"quantization gap: what the other export would differ by, not checked)")
    result.update(max_abs_diff=diff, tolerance=tol, quantization_gap=gap,
                  qlora_base=qlora_base if mode == "qlora" else None)
    if diff > tol:
        raise ParityError(f"parity check failed: the export differs from the trained model by {diff:.3e} "
                          f"(tolerance {tol:.1e}); nothing was written to the export_dir")
    return result


def _export_nanogpt(ckpt, folder, dtype, tolerance, log):
    """A nanoGPT checkpoint as a transformers model in `folder`, reloaded and compared with the model read from
    it."""
    from transformers import AutoModelForCausalLM

    iter_num, best = nanogpt.training_state(ckpt)
    log(f"nanoGPT checkpoint {ckpt}: iteration {iter_num}, best val loss {best:.4f}")
    loaded = load_nanogpt(ckpt)
    idx = parity_batch(loaded.vocab_limit, loaded.block_size)
    reference = logits_of(loaded.lm, idx)
    _save_merged(loaded.lm, folder, dtype)
    with_bpe = saving_into(folder, lambda: write_tokenizer(nanogpt.find_meta(ckpt)[0], folder))
    vocab = "the GPT-2 tokenizer" if with_bpe else "the characters' meta.pkl"
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    log(f"saved a transformers model ({dtype}, vocab {reference.size(-1):,}, exact GELU, with {vocab}): {files}")
    exported = AutoModelForCausalLM.from_pretrained(str(folder), dtype=TORCH_DTYPES[dtype]).eval()
    diff, tol = max_abs_diff(logits_of(exported, idx), reference), tolerance_for(reference, dtype, tolerance)
    log(f"parity on a fixed batch of {idx.size(0)}x{idx.size(1)} tokens: max |logits(AutoModelForCausalLM."
        f"from_pretrained(export)) - logits(the nanoGPT model)| = {diff:.3e} (tolerance {tol:.1e}): "
        f"{'ok' if diff <= tol else 'FAILED'}")
    if diff > tol:
        raise ParityError(f"parity check failed: the export differs from the nanoGPT model by {diff:.3e} "
                          f"(tolerance {tol:.1e}); nothing was written to the export_dir")
    return {"mode": "nanogpt", "dtype": dtype, "max_abs_diff": diff, "tolerance": tol, "quantization_gap": None}
