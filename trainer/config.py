"""Recipes and overrides -> one resolved config dict.

A recipe is a nanoGPT-style Python file of `key = value` lines. Every key must be
one of DEFAULTS; overrides `--key=value` are parsed as Python literals and must
have the default's type. Mistakes end in a one-line ConfigError.
"""
import ast
import difflib
import os
from pathlib import Path

from trainer.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"


class ConfigError(UserError):
    """A user mistake in a recipe or an override; main() prints it as one line."""


# The one place every key and its default lives (nanoGPT's train.py defaults, plus ours).
DEFAULTS = {
    # I/O
    "out_dir": "out",
    "eval_interval": 2000,
    "log_interval": 1,
    "eval_iters": 200,
    "eval_only": False,
    "always_save_checkpoint": True,
    "init_from": "scratch",  # scratch | resume | gpt2* hub name | local HF GPT-2 directory
    "overwrite": False,  # allow a fresh run in an out_dir that already holds another run
    "resume_tag": "",  # with init_from='resume': a checkpoint tag to resume from instead of `latest`
    "max_bad_steps": 10,  # stop after this many non-finite (NaN/inf) steps in a row
    # data
    "dataset": "openwebtext",  # or a list of datasets to mix, e.g. ['alpaca', 'shakespeare']
    "mix": "proportional",  # a list's sampling: 'proportional' (to size) or 'temperature:T' (size^(1/T))
    "data_dir": "data",  # datasets live in data_dir/<dataset>/ (relative to the current directory)
    "gradient_accumulation_steps": 40,  # total over all ranks, as in nanoGPT
    "batch_size": 12,
    "block_size": 1024,
    # model (from scratch; pretrained checkpoints bring their own shape)
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "dropout": 0.0,
    "bias": True,
    # optimizer
    "learning_rate": 6e-4,
    "max_iters": 600000,
    "max_epochs": 0.0,  # > 0: passes over the training data instead; sets max_iters and lr_decay_iters
    "weight_decay": 1e-1,
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    # learning-rate schedule
    "decay_lr": True,
    "warmup_iters": 2000,
    "lr_decay_iters": 600000,
    "min_lr": 6e-5,
    # the plan: 'auto' lets the planner choose
    "mode": "auto",  # auto | full | lora | qlora
    "zero_stage": "auto",  # auto | 0 | 1 | 2 | 3
    "offload": "auto",  # auto | none | optimizer | optimizer+params
    "gradient_checkpointing": "auto",  # auto | True | False
    "micro_batch_size": "auto",  # auto | int
    "dtype": "auto",  # auto | bf16 | fp16 | fp32
    # LoRA / QLoRA
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_targets": ["c_attn", "c_proj", "c_fc"],
    # logging and sampling
    "tensorboard": True,
    "sample_max_new_tokens": 200,
    "sample_start": "\n",
    "seed": 1337,
}

# Keys whose value may be 'auto' or a value of another type.
AUTO_KEYS = {"zero_stage": int, "gradient_checkpointing": bool, "micro_batch_size": int}
CHOICES = {
    "mode": ("auto", "full", "lora", "qlora"),
    "offload": ("auto", "none", "optimizer", "optimizer+params"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "zero_stage": ("auto", 0, 1, 2, 3),
}


def closest(name, candidates):
    """' (did you mean X?)' for a mistyped name, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(match)}?)" if match else ""


def _is_mix(value):
    """'proportional' or 'temperature:T' with a finite T > 0 (trainer/mixing.py reads it)."""
    if value == "proportional":
        return True
    kind, _, t = str(value).partition(":")
    try:
        return kind == "temperature" and 0 < float(t) < float("inf")
    except ValueError:
        return False


def check_value(key, value, source):
    """Type-check one value against its default; returns the value (ints widen to float)."""
    if key not in DEFAULTS:
        raise ConfigError(f"unknown key '{key}' in {source}{closest(key, DEFAULTS)}; "
                          f"see trainer/config.py for every key")
    default = DEFAULTS[key]
    if key in AUTO_KEYS and value == "auto":
        return value
    if key == "dataset" and type(value) is list:  # a mixture: a non-empty list of dataset names
        if not value or not all(type(v) is str and v for v in value):
            raise ConfigError(f"dataset={value!r} in {source} must be a name or a non-empty list of names")
        return value
    if key == "mix" and not _is_mix(value):
        raise ConfigError(f"mix={value!r} in {source} must be 'proportional' or 'temperature:T' with T > 0 "
                          f"(e.g. 'temperature:2')")
    if key == "max_epochs" and type(value) in (int, float) and value < 0:
        raise ConfigError(f"max_epochs={value!r} in {source} must be 0 (off: use max_iters) or more")
    want = AUTO_KEYS.get(key, type(default))
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ConfigError(f"{key}={value!r} in {source} must be of type {want.__name__}"
                          f"{' or auto' if key in AUTO_KEYS else ''} (like the default {default!r})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r} in {source} must be one of {', '.join(map(str, CHOICES[key]))}")
    if key == "lora_targets":
        bad = [t for t in value if t not in ("c_attn", "c_proj", "c_fc")]
        if bad or not value:
            raise ConfigError(f"lora_targets={value!r} in {source}: choose from 'c_attn', 'c_proj', 'c_fc'")
    return value


def resolve_recipe_path(name_or_path):
    """A recipe name from recipes/ or a path to a recipe file."""
    path = Path(name_or_path)
    if path.suffix == ".py" or os.sep in str(name_or_path):
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        return path
    path = RECIPES_DIR / f"{name_or_path}.py"
    if not path.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.py"))
        raise ConfigError(f"unknown recipe '{name_or_path}'{closest(name_or_path, names)}; "
                          f"known recipes: {', '.join(names)}")
    return path


def read_recipe(path):
    """Execute a recipe file and return its public `key = value` assignments, type-checked."""
    namespace = {}
    try:
        exec(compile(Path(path).read_text(), str(path), "exec"), {}, namespace)
    except Exception as exc:  # a recipe is user code: report where it broke, in one line
        raise ConfigError(f"recipe {path} failed to load: {type(exc).__name__}: {exc}") from None
    return {k: check_value(k, v, f"recipe {path}") for k, v in namespace.items() if not k.startswith("_")}


def parse_override(arg):
    """'--key=value' -> (key, value); the value is a Python literal, else a plain string."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"cannot read argument '{arg}': write overrides as --key=value")
    key, text = arg[2:].split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    return key, check_value(key, value, f"override {arg}")


def resolve_config(argv):
    """Command-line words -> config dict: defaults, then the recipe, then overrides in order.

    Accepts `--recipe NAME|PATH`, `--recipe=NAME`, a positional recipe path (nanoGPT style)
    and `--key=value` (or `--key value`) overrides. Returns (config, recipe_path or None).
    """
    recipe, overrides = None, []
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--recipe":
            if not words:
                raise ConfigError("--recipe needs a recipe name or path, e.g. --recipe shakespeare_char")
            recipe = words.pop(0)
        elif word.startswith("--recipe="):
            recipe = word.split("=", 1)[1]
        elif not word.startswith("--"):
            if "=" in word:
                raise ConfigError(f"cannot read argument '{word}': write overrides as --{word}")
            if recipe is not None:
                raise ConfigError(f"two recipes given ('{recipe}' and '{word}'): pass one")
            recipe = word
        elif "=" not in word and words and not words[0].startswith("--"):
            overrides.append(f"{word}={words.pop(0)}")  # `--mode lora` reads as `--mode=lora`
        else:
            overrides.append(word)
    config = dict(DEFAULTS)
    recipe_path = None
    if recipe is not None:
        recipe_path = resolve_recipe_path(recipe)
        config.update(read_recipe(recipe_path))
    for arg in overrides:
        key, value = parse_override(arg)
        config[key] = value
    return config, recipe_path
