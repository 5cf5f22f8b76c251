"""Recipes and overrides -> one resolved, validated config dict.

A recipe is a nanoGPT-style Python file of `key = value` lines; like nanoGPT's config files it may
import modules and compute values (only the resulting top-level names that are keys count). Every key
is declared once, in KEYS below, with its default, its valid values and a one-line meaning; that table
is the contract the rest of the trainer relies on (the planner, the loop and `--help` read it and check nothing
again). Overrides `--key=value` are parsed as Python literals and checked the same way. A mistake
is one ConfigError line naming the key, the value and what it must be.
"""
import argparse
import ast
import difflib
import os
import types
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.cli import FlagParser, Rule, at_least, between, more_than
from trainer.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"

# The choices of the plan keys (the planner and the adapters import these, nothing repeats them).
MODES = ("full", "lora", "qlora")
ADAPTER_MODES = ("lora", "qlora")
OFFLOADS = ("none", "optimizer", "optimizer+params")
DTYPES = ("bf16", "fp16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
# AdamW with 32-bit states (torch), or bitsandbytes' AdamW with 8-bit states, and either paged (CUDA unified memory)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "adamw4bit")
GRAD_ACCUM_DTYPES = ("fp32", "bf16")
# The weights the optimizer updates: fp32 masters (DeepSpeed's), or the bf16 weights themselves, their updates
# compensated by Kahan summation (torch-optimi) or stochastic rounding (torchao), or not (bf16: measured, never auto)
MASTER_WEIGHTS = ("fp32", "bf16_kahan", "bf16_sr", "bf16")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
# nanoGPT's dtype names (its train.py's `dtype`), read as ours
NANOGPT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# nanoGPT's keys that DeepSpeed decides here: accepted, not used (launch/train.py says what the run uses)
DEEPSPEED_DECIDES = ("device", "backend")
# How the adapters start: peft's default (A random, B zero), or from each weight's decomposition (the base
# then keeps the rest of the weight, so the model still starts as the base).
LORA_INITS = ("default", "pissa", "olora")


class ConfigError(UserError):
    """A user mistake in a recipe or an override; main() prints it as one line."""


def parse_mix(value):
    """'proportional' -> 1.0, 'temperature:T' -> T (finite, > 0); anything else -> None."""
    if value == "proportional":
        return 1.0
    kind, _, t = str(value).partition(":")
    try:
        t = float(t)
    except ValueError:
        return None
    return t if kind == "temperature" and 0 < t < float("inf") else None


@dataclass(frozen=True)
class Key:
    """One config key: its default, the values it accepts and what it means."""
    default: object
    meaning: str
    must: str = ""            # what a valid value is, as the error and --help say it ("1 or more")
    valid: object = None      # value -> bool, checked after the type; None: any value of the type
    auto: type = None         # the key also takes 'auto' (the planner decides); else values of this type
    group: str = ""
    spellings: dict = None    # other spellings of a value, as nanoGPT writes them ('bfloat16' -> 'bf16')


_POSITIVE = at_least(1)
_NON_NEGATIVE = at_least(0)
_PROBABILITY = between(0.0, 1.0)


def _key(default, meaning, rule=None, **kw):
    return Key(default, meaning, rule.must if rule else "", rule.valid if rule else None, **kw)


def _choice(default, choices, meaning, **kw):
    return Key(default, meaning, f"one of {', '.join(map(str, choices))}", lambda v: v in choices, **kw)


# The one place every key lives (nanoGPT's train.py names and defaults, plus the plan and adapters).
_GROUPS = {
    "I/O and checkpoints": {
        "out_dir": _key("out", "the run's folder: checkpoints, config, plan, TensorBoard events",
                        Rule(bool, "a folder path")),
        "eval_interval": _key(2000, "evaluate (and maybe save) every this many iterations", _POSITIVE),
        "log_interval": _key(1, "print and log training metrics every this many iterations", _POSITIVE),
        "eval_iters": _key(200, "evaluation batches per split (fixed windows, the same at every evaluation)",
                           _POSITIVE),
        "eval_only": _key(False, "evaluate once and exit"),
        "always_save_checkpoint": _key(True, "save at every evaluation, not only when val loss improves"),
        "init_from": _key("scratch", "scratch | resume | a GPT-2 hub name (gpt2, gpt2-medium, ...) | an HF "
                          "model directory | a run's out_dir (a new run from its weights) | a nanoGPT out_dir or "
                          "ckpt.pt", Rule(bool, "scratch, resume, a hub name, a folder or a ckpt.pt")),
        "overwrite": _key(False, "allow a fresh run in an out_dir that already holds another run"),
        "resume_tag": _key("", "with init_from=resume: the checkpoint tag to resume from instead of `latest`"),
        "init_adapters": _choice("keep", ("keep", "merge"), "with init_from=<a LoRA/QLoRA run's out_dir>: keep (train "
                                 "its adapters further, on its base, in its mode) or merge (train the base with the "
                                 "adapters merged in, in full mode)"),
        "max_bad_steps": _key(10, "stop after this many non-finite (NaN/inf) steps in a row", _POSITIVE),
        "early_stop": _key(0, "stop after this many evaluations without a new best val loss (0: off); needs "
                           "always_save_checkpoint=False, so the checkpoint kept is the best one", _NON_NEGATIVE),
    },
    "data": {
        "dataset": _key("openwebtext", "data_dir/<dataset>, or a list of datasets to mix, e.g. "
                        "['alpaca', 'shakespeare']", Rule(bool, "a name, or a non-empty list of names")),
        "mix": _key("proportional", "sampling of a dataset list: 'proportional' (to size) or 'temperature:T' "
                    "(size^(1/T))", Rule(lambda v: parse_mix(v) is not None,
                                          "'proportional' or 'temperature:T' with T > 0 (e.g. 'temperature:2')")),
        "data_dir": _key("data", "where datasets live (relative to the current directory)",
                         Rule(bool, "a folder path")),
        "gradient_accumulation_steps": _key(40, "micro-steps per iteration, over all ranks (as in nanoGPT)",
                                            _POSITIVE),
        "batch_size": _key(12, "sequences per micro-step; an iteration is batch_size x "
                           "gradient_accumulation_steps sequences", _POSITIVE),
        "block_size": _key(1024, "tokens per sequence (context length)", _POSITIVE),
    },
    "model (scratch; pretrained models bring their own shape)": {
        "n_layer": _key(12, "transformer blocks", _POSITIVE),
        "n_head": _key(12, "attention heads (must divide n_embd)", _POSITIVE),
        "n_embd": _key(768, "embedding width", _POSITIVE),
        "dropout": _key(0.0, "dropout probability (also overrides a pretrained model's)", _PROBABILITY),
        "neftune_alpha": _key(0.0, "NEFTune: uniform noise on the input embeddings while training, scaled by "
                              "alpha / sqrt(example length x n_embd) (0: off; the paper uses 5)", at_least(0.0)),
        "bias": _key(True, "biases in linear layers and LayerNorms (False: zeroed and frozen)"),
    },
    "optimizer (AdamW)": {
        "learning_rate": _key(6e-4, "peak learning rate", more_than(0)),
        "max_iters": _key(600000, "iterations to train", _NON_NEGATIVE),
        "max_epochs": _key(0.0, "> 0: passes over the training data instead; sets max_iters and lr_decay_iters",
                           Rule(lambda v: v >= 0, "0 (off: use max_iters) or more")),
        "weight_decay": _key(1e-1, "AdamW weight decay of 2-D weights", at_least(0.0)),
        "beta1": _key(0.9, "AdamW beta1", _PROBABILITY),
        "beta2": _key(0.95, "AdamW beta2", _PROBABILITY),
        "grad_clip": _key(1.0, "clip gradients at this global norm (0: no clipping)", at_least(0.0)),
    },
    "learning-rate schedule": {
        "decay_lr": _key(True, "linear warmup then cosine decay (False: constant learning_rate)"),
        "warmup_iters": _key(2000, "warmup iterations", _NON_NEGATIVE),
        "lr_decay_iters": _key(600000, "iteration where the cosine reaches min_lr", _NON_NEGATIVE),
        "min_lr": _key(6e-5, "learning rate at the end of the decay", at_least(0.0)),
    },
    "the plan ('auto': the planner chooses for your memory)": {
        "mode": _choice("auto", ("auto",) + MODES, "full finetuning, LoRA adapters, or LoRA on a 4-bit base"),
        "zero_stage": _choice("auto", ("auto",) + ZERO_STAGES, "DeepSpeed ZeRO stage", auto=int),
        "offload": _choice("auto", ("auto",) + OFFLOADS, "move optimizer states (and weights) to CPU memory"),
        "gradient_checkpointing": _key("auto", "recompute activations in the backward pass", auto=bool),
        "micro_batch_size": _key("auto", "sequences per forward pass per rank (accumulation makes up the rest)",
                                 _POSITIVE, auto=int),
        "dtype": _choice("auto", ("auto",) + DTYPES, "training precision (auto: bf16 or fp16 on GPUs, fp32 on CPU); "
                         "nanoGPT's 'bfloat16', 'float16', 'float32' are bf16, fp16, fp32", spellings=NANOGPT_DTYPES),
        "optimizer": _choice("auto", ("auto",) + OPTIMIZERS, "AdamW with 32-bit states, or bitsandbytes' 8-bit states "
                             "(paged_*: states in CUDA unified memory, paged to CPU under pressure), or torchao's "
                             "4-bit states (adamw4bit, with master_weights=bf16_sr)"),
        "grad_accum_dtype": _choice("auto", ("auto",) + GRAD_ACCUM_DTYPES, "with dtype=bf16 at ZeRO-0: "
                                    "accumulate gradients in an fp32 buffer, or in bf16 (2 bytes per parameter less "
                                    "between steps)"),
        "master_weights": _choice("auto", ("auto",) + MASTER_WEIGHTS, "with dtype=bf16 in full mode: fp32 master "
                                  "weights, or none (the bf16 weights updated with Kahan summation, stochastic "
                                  "rounding, or plain: 4 to 6 bytes per parameter less)"),
        "activation_offload": _key("auto", "with gradient checkpointing: keep the checkpointed activations in pinned "
                                   "CPU memory, copied on a side stream", auto=bool),
        "optimizer_in_backward": _key("auto", "with master_weights=bf16_kahan, one rank and no accumulation: step "
                                      "each tensor as soon as its gradient is complete (gradient release: no "
                                      "gradient held whole; per-tensor clipping)", auto=bool),
    },
    "speed": {
        "compile": _key("auto", "torch.compile the model (DeepSpeed's engine.compile(); auto: on GPUs, off on the "
                        "CPU, where compiling costs more than it saves)", auto=bool),
    },
    "LoRA / QLoRA": {
        "lora_r": _key(8, "adapter rank", _POSITIVE),
        "lora_alpha": _key(16, "adapter scaling numerator (scale = lora_alpha / lora_r)", _POSITIVE),
        "lora_dropout": _key(0.05, "dropout on the adapters' input", _PROBABILITY),
        "lora_targets": _key(list(LORA_TARGETS), "GPT-2 layers that get adapters",
                             Rule(lambda v: bool(v) and all(t in LORA_TARGETS for t in v),
                                  f"a non-empty list; choose from {', '.join(repr(t) for t in LORA_TARGETS)}")),
        "use_dora": _key(False, "DoRA: each adapted weight as a learned magnitude per output times a direction "
                         "(LoRA on the direction); keeps more activations, which the plan counts"),
        "use_rslora": _key(False, "rank-stabilized LoRA: scale = lora_alpha / sqrt(lora_r) instead of / lora_r"),
        "lora_init": _choice("default", LORA_INITS, "how the adapters start: default (A random, B zero), pissa "
                             "(each weight's top-r singular directions) or olora (its QR decomposition); pissa and "
                             "olora move that part out of the base weight, so they need mode=lora and a "
                             "pretrained init_from"),
        "loraplus_lr_ratio": _key(1.0, "LoRA+: the B matrices learn at learning_rate x this, through the whole "
                                  "schedule (1: off; the LoRA+ paper suggests 16)", more_than(0.0)),
    },
    "logging and sampling": {
        "tensorboard": _key(True, "write TensorBoard events to out_dir"),
        "sample_max_new_tokens": _key(200, "tokens of the sample logged at each evaluation (0: none)",
                                      _NON_NEGATIVE),
        "sample_start": _key("\n", "prompt of that sample"),
        "eval_generate": _key(0, "instruction data: at each evaluation answer this many fixed val examples "
                              "(greedy) and log exact match, ROUGE-L, BLEU and a few answers (0: off)", _NON_NEGATIVE),
        "seed": _key(1337, "seed of weights, data order and dropout", _NON_NEGATIVE),
        "wandb_log": _key(False, "also log the scalars and texts to Weights & Biases (pip install wandb; "
                          "WANDB_MODE=offline works without an account)"),
        "wandb_project": _key("gpt2-deepspeed-peft", "the W&B project", Rule(bool, "a project name")),
        "wandb_run_name": _key("", "the W&B run name ('': the out_dir's name)"),
    },
    "nanoGPT's keys that DeepSpeed decides here (accepted, not used; the run prints what it uses)": {
        "device": _key("", "nanoGPT's 'cuda', 'cpu', 'cuda:0', ...: each rank trains on its own GPU (LOCAL_RANK) when "
                       "there is one, else on the CPU (CUDA_VISIBLE_DEVICES= hides the GPUs)"),
        "backend": _key("", "nanoGPT's DDP backend ('nccl', 'gloo'): DeepSpeed chooses it (NCCL on GPUs, gloo on "
                        "CPUs)"),
    },
}
KEYS = {name: replace(key, group=group) for group, keys in _GROUPS.items() for name, key in keys.items()}
DEFAULTS = {name: key.default for name, key in KEYS.items()}

# Keys a run adds itself; a recipe or override cannot set them.
RUNTIME_KEYS = {
    "resumed_from": "the out_dir this run resumed (set on --init_from=resume; init_from then names the run's "
                    "original source)",
    "continued_from": "the run whose weights this run started from (set on --init_from=<a run's out_dir>; with "
                      "init_adapters=keep init_from then names that run's base)",
}


def closest(name, candidates):
    """' (did you mean X?)' for a mistyped name, or ''; config keys come with their meaning."""
    match = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    if not match:
        return ""
    return f" (did you mean {'; '.join(f'{m} ({KEYS[m].meaning})' if m in KEYS else m for m in match)}?)"


def recipe_summary(path):
    """A recipe's first comment line: what it trains."""
    first = Path(path).read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def describe_keys(width=100):
    """Every key by group, with its default, its valid values and its meaning (for --help)."""
    lines = []
    for group in dict.fromkeys(k.group for k in KEYS.values()):
        lines.append(f"\n{group}:")
        for name, key in KEYS.items():
            if key.group != group:
                continue
            valid = key.must or ("True or False" if isinstance(key.default, bool) else
                                 "a list of names" if isinstance(key.default, list) else "text")
            if key.auto is not None and "auto" not in valid:
                valid = f"auto, or {valid}" if key.must else "auto, True or False"
            lines.append(f"  --{name}={key.default!r}  [{valid}]")
            lines.append(f"      {key.meaning}")
    return "\n".join(lines)


def _type_of(key):
    spec = KEYS[key]
    return spec.auto or type(spec.default)


def check_value(key, value, source):
    """Type- and range-check one value; returns it (an int where a float is expected widens)."""
    if key not in KEYS:
        raise ConfigError(f"unknown key '{key}' in {source}{closest(key, KEYS)}; "
                          f"see `python launch/train.py --help` for every key")
    spec = KEYS[key]
    if spec.spellings and isinstance(value, str):
        value = spec.spellings.get(value, value)
    if spec.auto is not None and value == "auto":
        return value
    if key == "dataset":  # a name, or a mixture: a non-empty list of names
        if not (type(value) is str and value) and not (type(value) is list and value
                                                       and all(type(v) is str and v for v in value)):
            raise ConfigError(f"dataset={value!r} in {source} must be a name or a non-empty list of names")
        return value
    want = _type_of(key)
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ConfigError(f"{key}={value!r} in {source} must be of type {want.__name__}"
                          f"{' or auto' if spec.auto else ''} (like the default {spec.default!r})")
    if spec.valid is not None and not spec.valid(value):
        raise ConfigError(f"{key}={value!r} in {source} must be {spec.must}")
    return value


def check_config(cfg, source="the config"):
    """What no single key can say: constraints between keys and on the file system."""
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} in {source} must be a multiple of n_head={cfg['n_head']}")
    if cfg["early_stop"] and cfg["always_save_checkpoint"]:
        raise ConfigError(f"early_stop={cfg['early_stop']} in {source} keeps the best checkpoint, but "
                          f"always_save_checkpoint=True saves every evaluation; add --always_save_checkpoint=False")
    if cfg["use_dora"] and cfg["mode"] != "lora":
        why = {"auto": "the planner could choose full or qlora", "full": "full mode has no adapters",
               "qlora": "on a 4-bit base peft's DoRA dequantizes every adapted weight in each pass, which the "
                        "plan does not count"}[cfg["mode"]]
        raise ConfigError(f"use_dora=True in {source} needs mode=lora ({why}); add --mode=lora")
    if cfg["lora_init"] != "default":
        if cfg["mode"] != "lora":
            why = {"auto": "the planner could choose full or qlora", "full": "full mode has no adapters",
                   "qlora": "a 4-bit base cannot keep the rest of the weight exactly"}[cfg["mode"]]
            raise ConfigError(f"lora_init={cfg['lora_init']} in {source} rewrites the base weights as it starts the "
                              f"adapters, which needs mode=lora ({why}); add --mode=lora, or use --lora_init=default")
        if cfg["init_from"] == "scratch":
            raise ConfigError(f"lora_init={cfg['lora_init']} in {source} starts the adapters from pretrained weights, "
                              f"but init_from='scratch' has none; use --init_from=gpt2 (any GPT-2 hub name or HF "
                              f"directory), or --lora_init=default")
    out_dir = Path(cfg["out_dir"])
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={cfg['out_dir']!r} is a file, not a folder; choose another --out_dir")
    return cfg


def resolve_recipe_path(name_or_path):
    """A recipe name from recipes/ or a path to a recipe file."""
    path = Path(name_or_path)
    if path.suffix == ".py" or os.sep in str(name_or_path):
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        return path
    path = RECIPES_DIR / f"{name_or_path}.py"
    if not path.is_file():
        names = recipe_names()
        raise ConfigError(f"unknown recipe '{name_or_path}'{closest(name_or_path, names)}; "
                          f"known recipes: {', '.join(names)}")
    return path


def recipe_names():
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py"))


def is_code(value):
    """A module, class or function a recipe defined or imported (nanoGPT's `import time`): not a value."""
    return isinstance(value, (types.ModuleType, type)) or callable(value)


def read_recipe(path):
    """Execute a recipe file and return its top-level values, type-checked.

    A recipe is Python, as nanoGPT's config files are: it may import modules and compute values
    (`wandb_run_name = 'ft-' + str(time.time())`). Only the resulting top-level names count: modules,
    classes, functions and `_private` names are ignored, and every other name must be a key (a typo
    is an error naming the closest keys)."""
    namespace = {}
    try:  # one namespace, as a module has: functions and comprehensions in the recipe see its imports
        exec(compile(Path(path).read_text(), str(path), "exec"), namespace)
    except Exception as exc:  # a recipe is user code: report where it broke, in one line
        raise ConfigError(f"recipe {path} failed to load: {type(exc).__name__}: {exc}") from None
    return {k: check_value(k, v, f"recipe {path}") for k, v in namespace.items()
            if not k.startswith("_") and not is_code(v)}


def literal(text):
    """An override's value: a Python literal (3, 1e-4, False, ['c_attn']), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _override(key):
    """argparse type of one key: the text as a literal, checked against the table (errors name the key)."""
    def parse(text):
        return check_value(key, literal(text), f"override --{key}={text}")
    parse.__name__ = key
    return parse


def add_config_arguments(parser):
    """The recipe (`--recipe NAME|PATH` or nanoGPT's positional path) and every key as `--key=value`
    (or `--key value`) on a FlagParser; read the result with config_from_args."""
    parser.add_argument("recipe_words", nargs="*", default=[])
    parser.add_argument("--recipe", dest="recipe_flag", default=None)
    for name in KEYS:
        # SUPPRESS: a key not given is absent from the namespace, so the recipe's value stays
        parser.add_argument(f"--{name}", type=_override(name), default=argparse.SUPPRESS)
    return parser


def config_from_args(args, unknown=()):
    """(config, recipe path or None) from a parse of add_config_arguments' flags: defaults, then the
    recipe, then the overrides. `unknown`: the words argparse did not recognize (parse_known_args)."""
    for word in unknown:
        if word.startswith("--"):
            key = word[2:].partition("=")[0]
            check_value(key, None, f"override {word}")  # names the closest keys
        raise ConfigError(f"cannot read argument '{word}': write overrides as --key=value")
    words = list(args.recipe_words) + ([args.recipe_flag] if args.recipe_flag is not None else [])
    for word in words:
        if "=" in word and not Path(word).is_file():
            raise ConfigError(f"cannot read argument '{word}': write overrides as --{word}")
    if len(words) > 1:
        raise ConfigError(f"two recipes given ('{words[0]}' and '{words[1]}'): pass one")
    config = dict(DEFAULTS)
    recipe_path = None
    if words:
        recipe_path = resolve_recipe_path(words[0])
        config.update(read_recipe(recipe_path))
    config.update({name: getattr(args, name) for name in KEYS if hasattr(args, name)})
    return check_config(config, f"recipe {recipe_path}" if recipe_path else "the overrides"), recipe_path


def resolve_config(argv):
    """Command-line words -> (config, recipe path or None): `--recipe NAME|PATH` or a positional recipe
    path (nanoGPT style), and `--key=value` or `--key value` overrides (a later one wins)."""
    parser = add_config_arguments(FlagParser("recipe and overrides"))
    args, unknown = parser.parse_known_args(list(argv))
    return config_from_args(args, unknown)
