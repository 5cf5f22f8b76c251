"""Recipes and overrides -> one resolved, validated Config.

A recipe is a nanoGPT-style Python file of `key = value` lines; like nanoGPT's config files it may
import modules and compute values (only the resulting top-level names that are keys count). Every key
is declared once, as a field of its group's dataclass below (litgpt's typed groups), with its default,
its valid values and a one-line meaning; Config joins the groups, so the keys stay nanoGPT's flat names
(cfg.learning_rate, `learning_rate = 3e-5`, `--learning_rate=3e-5`). Those fields are the contract the
rest of the trainer relies on (the planner, the loop and `--help` read them and check nothing again).
Overrides `--key=value` are parsed as Python literals and checked the same way. A mistake is one
ConfigError line naming the key, the value (and where it was given) and what it must be.
"""
import argparse
import ast
import difflib
import os
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

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
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "adamw4bit", "adam_mini")
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
    """One config key: its default, the values it accepts and what it means (a field's metadata)."""
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
Auto = Literal["auto"]  # a plan key's 'auto': the planner chooses


def key(default, meaning, rule=None, **kw):
    """A config field: its default, its meaning (--help, the error's 'did you mean') and its range."""
    spec = Key(default, meaning, rule.must if rule else "", rule.valid if rule else None, **kw)
    if isinstance(default, list):  # each config gets its own list
        return field(default_factory=lambda: list(default), metadata={"key": spec})
    return field(default=default, metadata={"key": spec})


def choice(default, choices, meaning, **kw):
    """A config field that takes one of `choices`."""
    return key(default, meaning, Rule(lambda v: v in choices, f"one of {', '.join(map(str, choices))}"), **kw)


class _Checked:
    """The end of the groups' chain of checks (each group's __post_init__ checks its fields, then the next's)."""
    def __post_init__(self):
        pass


def group(title):
    """A group of keys: a dataclass under `title` (--help's heading) whose __post_init__ checks its own
    fields against their Key (type, range, choices, spellings) and then hands on to the next group."""
    def make(cls):
        cls = dataclass(cls)
        cls.title = title
        own = tuple(f.name for f in fields(cls))

        def __post_init__(self):
            for name in own:  # a value's other spelling ('bfloat16') is stored as ours, an int widens to a float
                object.__setattr__(self, name, check_value(name, getattr(self, name), "the config"))
            super(cls, self).__post_init__()
        cls.__post_init__ = __post_init__
        return cls
    return make


# Every key, once, by group: nanoGPT's train.py names and defaults, plus the plan and the adapters. A new key is
# one line in its group: `name: type = key(default, meaning, rule)` (or `choice(default, CHOICES, meaning)`);
# recipes, overrides, --help, the checks and config.json take it from there.

@group("I/O and checkpoints")
class Checkpoints(_Checked):
    out_dir: str = key("out", "the run's folder: checkpoints, config, plan, TensorBoard events",
                       Rule(bool, "a folder path"))
    eval_interval: int = key(2000, "evaluate (and maybe save) every this many iterations", _POSITIVE)
    log_interval: int = key(1, "print and log training metrics every this many iterations", _POSITIVE)
    eval_iters: int = key(200, "evaluation batches per split (fixed windows, the same at every evaluation)",
                          _POSITIVE)
    eval_only: bool = key(False, "evaluate once and exit")
    always_save_checkpoint: bool = key(True, "save at every evaluation, not only when val loss improves")
    init_from: str = key("scratch", "scratch | resume | a GPT-2 hub name (gpt2, gpt2-medium, ...) | an HF "
                         "model directory | a run's out_dir (a new run from its weights) | a nanoGPT out_dir or "
                         "ckpt.pt", Rule(bool, "scratch, resume, a hub name, a folder or a ckpt.pt"))
    overwrite: bool = key(False, "allow a fresh run in an out_dir that already holds another run")
    resume_tag: str = key("", "with init_from=resume: the checkpoint tag to resume from instead of `latest`")
    init_adapters: str = choice("keep", ("keep", "merge"), "with init_from=<a LoRA/QLoRA run's out_dir>: keep "
                                "(train its adapters further, on its base, in its mode) or merge (train the base "
                                "with the adapters merged in, in full mode)")
    max_bad_steps: int = key(10, "stop after this many non-finite (NaN/inf) steps in a row", _POSITIVE)
    early_stop: int = key(0, "stop after this many evaluations without a new best val loss (0: off); needs "
                          "always_save_checkpoint=False, so the checkpoint kept is the best one", _NON_NEGATIVE)


@group("data")
class Data(_Checked):
    dataset: str | list[str] = key("openwebtext", "data_dir/<dataset>, or a list of datasets to mix, e.g. "
                                   "['alpaca', 'shakespeare']", Rule(bool, "a name, or a non-empty list of names"))
    mix: str = key("proportional", "sampling of a dataset list: 'proportional' (to size) or 'temperature:T' "
                   "(size^(1/T))", Rule(lambda v: parse_mix(v) is not None,
                                         "'proportional' or 'temperature:T' with T > 0 (e.g. 'temperature:2')"))
    data_dir: str = key("data", "where datasets live (relative to the current directory)",
                        Rule(bool, "a folder path"))
    gradient_accumulation_steps: int = key(40, "micro-steps per iteration, over all ranks (as in nanoGPT)",
                                           _POSITIVE)
    batch_size: int = key(12, "nanoGPT's batch size: an iteration trains batch_size x gradient_accumulation_steps "
                          "sequences and an evaluation reads eval_iters x batch_size windows per split; the "
                          "plan's micro_batch_size decides the sequences per forward pass", _POSITIVE)
    block_size: int = key(1024, "tokens per sequence (context length)", _POSITIVE)


@group("model (scratch; pretrained models bring their own shape)")
class Model(_Checked):
    n_layer: int = key(12, "transformer blocks", _POSITIVE)
    n_head: int = key(12, "attention heads (must divide n_embd)", _POSITIVE)
    n_embd: int = key(768, "embedding width", _POSITIVE)
    dropout: float = key(0.0, "dropout probability (also overrides a pretrained model's)", _PROBABILITY)
    neftune_alpha: float = key(0.0, "NEFTune: uniform noise on the input embeddings while training, scaled by "
                               "alpha / sqrt(example length x n_embd) (0: off; the paper uses 5)", at_least(0.0))
    bias: bool = key(True, "biases in linear layers and LayerNorms (False: zeroed and frozen)")


@group("optimizer (AdamW)")
class Optimizer(_Checked):
    learning_rate: float = key(6e-4, "peak learning rate", more_than(0))
    max_iters: int = key(600000, "iterations to train", _NON_NEGATIVE)
    max_epochs: float = key(0.0, "> 0: passes over the training data instead; sets max_iters and lr_decay_iters",
                            Rule(lambda v: v >= 0, "0 (off: use max_iters) or more"))
    weight_decay: float = key(1e-1, "AdamW weight decay of 2-D weights", at_least(0.0))
    beta1: float = key(0.9, "AdamW beta1", _PROBABILITY)
    beta2: float = key(0.95, "AdamW beta2", _PROBABILITY)
    grad_clip: float = key(1.0, "clip gradients at this global norm (0: no clipping)", at_least(0.0))


@group("learning-rate schedule")
class Schedule(_Checked):
    decay_lr: bool = key(True, "linear warmup then cosine decay (False: constant learning_rate)")
    warmup_iters: int = key(2000, "warmup iterations", _NON_NEGATIVE)
    lr_decay_iters: int = key(600000, "iteration where the cosine reaches min_lr", _NON_NEGATIVE)
    min_lr: float = key(6e-5, "learning rate at the end of the decay", at_least(0.0))


@group("the plan ('auto': the planner chooses for your memory)")
class Plan(_Checked):
    mode: str = choice("auto", ("auto",) + MODES, "full finetuning, LoRA adapters, or LoRA on a 4-bit base")
    zero_stage: int | Auto = choice("auto", ("auto",) + ZERO_STAGES, "DeepSpeed ZeRO stage", auto=int)
    offload: str = choice("auto", ("auto",) + OFFLOADS, "move optimizer states (and weights) to CPU memory")
    gradient_checkpointing: bool | Auto = key("auto", "recompute activations in the backward pass", auto=bool)
    micro_batch_size: int | Auto = key("auto", "sequences per forward pass per rank (accumulation makes up the "
                                       "rest)", _POSITIVE, auto=int)
    dtype: str = choice("auto", ("auto",) + DTYPES, "training precision (auto: bf16 or fp16 on GPUs, fp32 on "
                        "CPU); nanoGPT's 'bfloat16', 'float16', 'float32' are bf16, fp16, fp32",
                        spellings=NANOGPT_DTYPES)
    optimizer: str = choice("auto", ("auto",) + OPTIMIZERS, "AdamW with 32-bit states, or bitsandbytes' 8-bit "
                            "states (paged_*: states in CUDA unified memory, paged to CPU under pressure), or "
                            "torchao's 4-bit states (adamw4bit, with master_weights=bf16_sr), or Adam-mini's factored "
                            "second moments (adam_mini: full mode at fp32, or on bf16 weights with master_weights=bf16)")
    grad_accum_dtype: str = choice("auto", ("auto",) + GRAD_ACCUM_DTYPES, "with dtype=bf16 at ZeRO-0: "
                                   "accumulate gradients in an fp32 buffer, or in bf16 (2 bytes per parameter "
                                   "less between steps)")
    master_weights: str = choice("auto", ("auto",) + MASTER_WEIGHTS, "with dtype=bf16 in full mode: fp32 master "
                                 "weights, or none (the bf16 weights updated with Kahan summation, stochastic "
                                 "rounding, or plain: 8 to 10 bytes per parameter less; auto: fp32 where it fits "
                                 "as fast, else bf16_kahan or bf16_sr, which the quality table admits)")
    activation_offload: bool | Auto = key("auto", "with gradient checkpointing: keep the checkpointed activations "
                                          "in pinned CPU memory, copied on a side stream", auto=bool)
    optimizer_in_backward: bool | Auto = key("auto", "with bf16 weights without masters (master_weights bf16_kahan, "
                                             "bf16_sr, bf16), one rank and no accumulation: "
                                             "step each tensor as soon as its gradient is complete (gradient "
                                             "release: no gradient held whole; per-tensor clipping; auto: only "
                                             "where the ordinary step does not fit, with bf16_kahan or "
                                             "bf16_sr+adamw4bit)", auto=bool)


@group("speed")
class Speed(_Checked):
    compile: bool | Auto = key("auto", "torch.compile the model (DeepSpeed's engine.compile(); auto: on GPUs, off "
                               "on the CPU, where compiling costs more than it saves)", auto=bool)


@group("LoRA / QLoRA")
class Lora(_Checked):
    lora_r: int = key(8, "adapter rank", _POSITIVE)
    lora_alpha: int = key(16, "adapter scaling numerator (scale = lora_alpha / lora_r)", _POSITIVE)
    lora_dropout: float = key(0.05, "dropout on the adapters' input", _PROBABILITY)
    lora_targets: list[str] = key(list(LORA_TARGETS), "GPT-2 layers that get adapters",
                                  Rule(lambda v: bool(v) and all(t in LORA_TARGETS for t in v),
                                       f"a non-empty list; choose from {', '.join(repr(t) for t in LORA_TARGETS)}"))
    use_dora: bool = key(False, "DoRA: each adapted weight as a learned magnitude per output times a direction "
                         "(LoRA on the direction); keeps more activations, which the plan counts")
    use_rslora: bool = key(False, "rank-stabilized LoRA: scale = lora_alpha / sqrt(lora_r) instead of / lora_r")
    lora_init: str = choice("default", LORA_INITS, "how the adapters start: default (A random, B zero), pissa "
                            "(each weight's top-r singular directions) or olora (its QR decomposition); pissa and "
                            "olora move that part out of the base weight, so they need mode=lora and a "
                            "pretrained init_from")
    loraplus_lr_ratio: float = key(1.0, "LoRA+: the B matrices learn at learning_rate x this, through the whole "
                                   "schedule (1: off; the LoRA+ paper suggests 16)", more_than(0.0))


@group("logging and sampling")
class Logging(_Checked):
    tensorboard: bool = key(True, "write TensorBoard events to out_dir")
    sample_max_new_tokens: int = key(200, "tokens of the sample logged at each evaluation (0: none)",
                                     _NON_NEGATIVE)
    sample_start: str = key("\n", "prompt of that sample")
    eval_generate: int = key(0, "instruction data: at each evaluation answer this many fixed val examples "
                             "(greedy) and log exact match, ROUGE-L, BLEU and a few answers (0: off)", _NON_NEGATIVE)
    log_level: str = choice("info", ("info", "debug"), "debug: also print the start-up's phases (seconds from the "
                            "command to the first iteration: launcher, imports, plan, model, engine, data)")
    seed: int = key(1337, "seed of weights, data order and dropout", _NON_NEGATIVE)
    wandb_log: bool = key(False, "also log the scalars and texts to Weights & Biases (pip install wandb; "
                          "WANDB_MODE=offline works without an account)")
    wandb_project: str = key("gpt2-deepspeed-peft", "the W&B project", Rule(bool, "a project name"))
    wandb_run_name: str = key("", "the W&B run name ('': the out_dir's name)")


@group("nanoGPT's keys that DeepSpeed decides here (accepted, not used; the run prints what it uses)")
class DeepSpeedDecides(_Checked):
    device: str = key("", "nanoGPT's 'cuda', 'cpu', 'cuda:0', ...: each rank trains on its own GPU (LOCAL_RANK) "
                      "when there is one, else on the CPU (CUDA_VISIBLE_DEVICES= hides the GPUs)")
    backend: str = key("", "nanoGPT's DDP backend ('nccl', 'gloo'): DeepSpeed chooses it (NCCL on GPUs, gloo on "
                       "CPUs)")


# The groups a recipe and the command line set, in --help's order.
GROUPS = (Checkpoints, Data, Model, Optimizer, Schedule, Plan, Speed, Lora, Logging, DeepSpeedDecides)


@dataclass
class RunAdded(_Checked):
    """Keys a run adds itself ('' until then); a recipe or override cannot set them."""
    resumed_from: str = field(default="", metadata={"meaning": "the out_dir this run resumed (set on "
                              "--init_from=resume; init_from then names the run's original source)"})
    continued_from: str = field(default="", metadata={"meaning": "the run whose weights this run started from (set "
                                "on --init_from=<a run's out_dir>; with init_adapters=keep init_from then names that "
                                "run's base)"})


@dataclass
class Config(RunAdded, *reversed(GROUPS)):  # reversed: a dataclass lists the last base's fields first
    """The resolved configuration: every group's keys as flat attributes (cfg.learning_rate), as nanoGPT's
    flat names; each group's __post_init__ has checked its own (Config(...) and dataclasses.replace check
    again). Read by attribute only (to_dict() for JSON); a name that is no key fails on assignment here,
    and tests/test_config_uses.py finds a misspelt read before anything runs."""

    def __setattr__(self, name, value):
        if name not in FIELDS:
            raise AttributeError(f"the config has no key {name!r}{closest(name, FIELDS)}")
        object.__setattr__(self, name, value)

    @classmethod
    def saved(cls, values):
        """A config.json's values: a key this trainer no longer has is left out, one it did not have yet is
        the default."""
        return cls(**{name: value for name, value in values.items() if name in FIELDS})

    def to_dict(self):
        """What config.json holds: every key, and the run's own keys once set."""
        return {name: list(v) if isinstance(v, list) else v for name, v in
                ((f.name, getattr(self, f.name)) for f in fields(self)) if name in KEYS or v}


FIELDS = frozenset(f.name for f in fields(Config))
KEYS = {f.name: replace(f.metadata["key"], group=g.title) for g in GROUPS for f in fields(g)}
DEFAULTS = {name: key.default for name, key in KEYS.items()}
# Keys a run adds itself; a recipe or override cannot set them.
RUNTIME_KEYS = {f.name: f.metadata["meaning"] for f in fields(RunAdded)}


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
    for group in GROUPS:
        lines.append(f"\n{group.title}:")
        for name in (f.name for f in fields(group)):
            key = KEYS[name]
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
    """What no single key can say: constraints between keys and on the file system (checked where a
    recipe and overrides are resolved, naming them; a run's own later changes keep them)."""
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd={cfg.n_embd} in {source} must be a multiple of n_head={cfg.n_head}")
    if cfg.early_stop and cfg.always_save_checkpoint:
        raise ConfigError(f"early_stop={cfg.early_stop} in {source} keeps the best checkpoint, but "
                          f"always_save_checkpoint=True saves every evaluation; add --always_save_checkpoint=False")
    if cfg.use_dora and cfg.mode != "lora":
        why = {"auto": "the planner could choose full or qlora", "full": "full mode has no adapters",
               "qlora": "on a 4-bit base peft's DoRA dequantizes every adapted weight in each pass, which the "
                        "plan does not count"}[cfg.mode]
        raise ConfigError(f"use_dora=True in {source} needs mode=lora ({why}); add --mode=lora")
    if cfg.lora_init != "default":
        if cfg.mode != "lora":
            why = {"auto": "the planner could choose full or qlora", "full": "full mode has no adapters",
                   "qlora": "a 4-bit base cannot keep the rest of the weight exactly"}[cfg.mode]
            raise ConfigError(f"lora_init={cfg.lora_init} in {source} rewrites the base weights as it starts the "
                              f"adapters, which needs mode=lora ({why}); add --mode=lora, or use --lora_init=default")
        if cfg.init_from == "scratch":
            raise ConfigError(f"lora_init={cfg.lora_init} in {source} starts the adapters from pretrained weights, "
                              f"but init_from='scratch' has none; use --init_from=gpt2 (any GPT-2 hub name or HF "
                              f"directory), or --lora_init=default")
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={cfg.out_dir!r} is a file, not a folder; choose another --out_dir")
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
    recipe_path = resolve_recipe_path(words[0]) if words else None
    values = read_recipe(recipe_path) if recipe_path else {}
    values.update({name: getattr(args, name) for name in KEYS if hasattr(args, name)})
    config = Config(**values)  # every value is checked already, naming the recipe or the override
    return check_config(config, f"recipe {recipe_path}" if recipe_path else "the overrides"), recipe_path


def resolve_config(argv):
    """Command-line words -> (config, recipe path or None): `--recipe NAME|PATH` or a positional recipe
    path (nanoGPT style), and `--key=value` or `--key value` overrides (a later one wins)."""
    parser = add_config_arguments(FlagParser("recipe and overrides"))
    args, unknown = parser.parse_known_args(list(argv))
    return config_from_args(args, unknown)
