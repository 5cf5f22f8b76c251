"""A new run that starts from a finished model: another run's out_dir (this trainer's) or a nanoGPT
checkpoint, trained on any dataset as a new run (its own out_dir, iteration 0, a fresh optimizer and
learning-rate schedule). `--init_from=resume` is the other way: the same run, the same data, continued.

- `--init_from=<a run's out_dir>` takes that run's latest checkpoint (its best: every recipe saves only
  improvements). A full run gives its weights (its architecture from its model_config.json) and the new
  run trains them in full mode. A LoRA/QLoRA run gives, with `init_adapters=keep` (the default), its
  adapters, trained further on the same base (its own init_from) in its mode; with `init_adapters=merge`,
  its base with the adapters merged in, trained in full mode. New adapters on a continued full model
  need that model on disk as a base: export it (merge_adapter.py) and start from the export.
- `--init_from=<a nanoGPT out_dir or ckpt.pt>`: its weights, read by trainer/model/nanogpt.py through
  the model builder like any pretrained source (so in any mode).
Either way the model keys the weights fix (bias; a kept adapter's r, alpha and targets) come from the
source, and the new data must use the source's vocabulary.
"""
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import ADAPTER_MODES, DEFAULTS, Config
from trainer.data.tokenizer import tokenizer_kind
from trainer.errors import UserError
from trainer.model import nanogpt
from trainer.run import checkpoint, consolidate
from trainer.run.run_dir import RunDir
from trainer.run.weights import adapter_state_dict, load_adapter_run

# What a kept adapter carries: the new run trains the same adapters on the same base
KEPT_ADAPTER_KEYS = ("bias", "lora_r", "lora_alpha", "lora_targets")


@dataclass
class Start:
    cfg: Config
    note: str           # what the run takes from its source, for the console
    source: str         # the source as init_from named it
    vocabulary: dict    # the source model's vocabulary, as a dataset's meta.pkl dict


def is_run(source):
    """init_from names a finished run of this trainer (its out_dir)."""
    return source not in ("scratch", "resume") and RunDir(source).is_run()


def starting_point(cfg):
    """The Start of a run from another run or a nanoGPT checkpoint, or None for any other init_from."""
    source = cfg.init_from
    if is_run(source):
        return continue_run(cfg)
    ckpt = nanogpt.checkpoint_path(source)
    if ckpt is None:
        return None
    cfg = take_model_keys(cfg, {"bias": nanogpt.model_args(ckpt)["bias"]}, f"the nanoGPT checkpoint {ckpt}")
    return Start(cfg, nanogpt.describe(ckpt), source, nanogpt.find_meta(ckpt, cfg.data_dir)[0])


def take_model_keys(cfg, saved, source):
    """The source's values of the keys its weights fix; one the command asks for otherwise is an error."""
    cfg = replace(cfg)
    for key, value in saved.items():  # computed keys: KEPT_ADAPTER_KEYS and 'bias', from the callers below
        asked = getattr(cfg, key)  # computed keys: as above
        if asked != value and asked != DEFAULTS[key]:
            raise UserError(f"{source} holds a model with {key}={value!r}, but this run asks for {key}={asked!r}; "
                            f"leave --{key} unset (the model's own) or start from another model")
        setattr(cfg, key, value)  # computed keys: as above
    return cfg


def continue_run(cfg):
    src = RunDir(cfg.init_from)
    if Path(cfg.out_dir).resolve() == src.path.resolve():
        raise UserError(f"init_from={cfg.init_from!r} starts a new run from that run, but out_dir is the same "
                        f"folder; choose another --out_dir (or continue the run itself with --init_from=resume)")
    tag = checkpoint.latest_tag_or_error(src.path)
    saved_cfg, mode = src.config(), src.mode()
    taken = f"{src} ({tag}, {mode} mode)"
    if mode in ADAPTER_MODES and cfg.init_adapters == "keep":
        if saved_cfg.init_from == "scratch":
            raise UserError(f"{src} trained adapters on a from-scratch base, which only that run can rebuild; "
                            f"continue it with --init_adapters=merge (its base with the adapters merged in)")
        if cfg.mode not in ("auto", mode):
            raise UserError(f"init_adapters='keep' trains the {mode} adapters of {src} further, in {mode} mode, but "
                            f"this run asks for mode={cfg.mode}; leave --mode unset, or pass "
                            f"--init_adapters=merge to train the merged model in full mode")
        cfg = take_model_keys(cfg, {k: getattr(saved_cfg, k) for k in KEPT_ADAPTER_KEYS}, src)
        cfg = replace(cfg, mode=mode, init_from=saved_cfg.init_from)
        what = (f"its {mode} adapters (r={saved_cfg.lora_r}, targets {', '.join(saved_cfg.lora_targets)}) on "
                f"its base {saved_cfg.init_from}, trained further")
    else:
        if cfg.mode not in ("auto", "full"):
            raise UserError(f"a run continued from {src} trains its whole model (mode full), not mode={cfg.mode}; "
                            f"to train adapters on it, export it first (python launch/merge_adapter.py --out_dir={src} "
                            f"--export_dir=DIR) and start from --init_from=DIR")
        cfg = take_model_keys(cfg, {"bias": saved_cfg.bias}, src)
        cfg.mode = "full"
        what = "its base with the adapters merged in" if mode in ADAPTER_MODES else "its weights"
    cfg.continued_from = str(src)
    note = (f"init_from={src}: a new run from {taken}: {what}; the optimizer, iteration count and learning-rate "
            f"schedule start fresh on dataset {cfg.dataset!r}")
    return Start(cfg, note, str(src), src.meta())


def check_vocabulary(start, data):
    """The new data must be tokenized as the source model was (the same characters for a character model)."""
    model, given = start.vocabulary, data.meta
    kind, data_kind = tokenizer_kind(model), tokenizer_kind(given)
    same = kind == data_kind and (kind != "char" or model.get("stoi") == given.get("stoi"))
    if not same:
        raise UserError(f"{start.source} was trained on the {kind} vocabulary ({model['vocab_size']} ids), but "
                        f"{', '.join(data.names)} is prepared with the {data_kind} one ({given['vocab_size']} ids); "
                        f"prepare the data with the model's tokenizer (characters: its meta.pkl's)")


def model_config(cfg):
    """The architecture a run continued in full mode rebuilds (the source's model_config.json), else None."""
    source = cfg.continued_from
    return RunDir(source).model_config_path if source and cfg.mode == "full" else None


def load_weights(module, cfg):
    """Into a new run's module, before its engine exists: the source run's weights (full mode) or its
    adapters (init_adapters=keep). Nothing for any other run."""
    source = cfg.continued_from
    if not source:
        return
    if cfg.mode in ADAPTER_MODES:  # the same adapters, on the base the module was built from
        missing, unexpected = module.lm.load_state_dict(adapter_state_dict(source), strict=False)
        missing = [k for k in missing if ".lora_" in k]
    else:
        if RunDir(source).mode() in ADAPTER_MODES:
            weights = load_adapter_run(source, quantized=False).merge_and_unload().state_dict()
        else:
            weights = consolidate.consolidated_state_dict(source)
        missing, unexpected = module.lm.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte, saved once
        module.lm.tie_weights()
    if missing or unexpected:
        raise UserError(f"the checkpoint of {source} does not match the model built from it (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); is the run's folder complete?")
