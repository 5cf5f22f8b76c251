"""Recipes, overrides and their errors."""
import re

import pytest

from trainer.config import DEFAULTS, RECIPES_DIR, Config, ConfigError, recipe_names, resolve_config

# docs/commands.md's recipe table (the original design's): (init_from, batch_size, grad_accum, learning_rate, decay_lr, max_iters, eval_interval,
# eval_iters, out_dir or dataset)
DESIGN_TABLE = {
    "gpt2_small": ("gpt2", 8, 8, 3e-5, True, 5000, 250, 200, "out-finetune-gpt2-small"),
    "gpt2_medium": ("gpt2-medium", 4, 8, 3e-5, True, 5000, 250, 200, "out-finetune-gpt2-medium"),
    "gpt2_large": ("gpt2-large", 2, 8, 3e-5, True, 5000, 250, 200, "out-finetune-gpt2-large"),
    "gpt2_xl": ("gpt2-xl", 1, 8, 3e-5, True, 5000, 250, 200, "out-finetune-gpt2-xl"),
    "finetune_shakespeare": ("gpt2-xl", 1, 32, 3e-5, False, 20, 5, 40, "out-shakespeare"),
    "finetune_gpt2_medium": ("gpt2-medium", 2, 16, 3e-5, False, 20, 5, 40, "out-shakespeare-gpt2-medium"),
    "gpt2_124m_single_gpu": ("scratch", 4, 12, 6e-4, True, 600000, 1000, 200, None),
    "gpt2_124m_multi_gpu": ("scratch", 12, 40, 6e-4, True, 600000, 1000, 200, None),
    "shakespeare_char": ("scratch", 64, 1, 1e-3, True, 5000, 250, 200, "out-shakespeare-char"),
    "shakespeare_char_cpu": ("scratch", 12, 1, 1e-3, True, 2000, 250, 20, "out-shakespeare-char-cpu"),
}


@pytest.mark.parametrize("name", sorted(DESIGN_TABLE))
def test_recipe_values_match_design(name):
    cfg, path = resolve_config(["--recipe", name])
    init_from, bs, ga, lr, decay, iters, ev_int, ev_iters, out_dir = DESIGN_TABLE[name]
    assert path == RECIPES_DIR / f"{name}.py"
    assert (cfg.init_from, cfg.batch_size, cfg.gradient_accumulation_steps) == (init_from, bs, ga)
    assert (cfg.learning_rate, cfg.decay_lr, cfg.max_iters) == (lr, decay, iters)
    assert (cfg.eval_interval, cfg.eval_iters) == (ev_int, ev_iters)
    assert cfg.always_save_checkpoint is False
    if out_dir:
        assert cfg.out_dir == out_dir
    if name.startswith("gpt2_1"):
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
        assert cfg.dataset == "openwebtext" and cfg.min_lr == 6e-5 and cfg.warmup_iters == 2000
    elif name.startswith("shakespeare_char"):
        assert cfg.dataset == "shakespeare_char" and cfg.min_lr == 1e-4
    else:
        assert cfg.dataset == "shakespeare"
    if name in ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl"):
        assert (cfg.warmup_iters, cfg.lr_decay_iters, cfg.min_lr) == (100, 5000, 3e-6)


EXTRA_RECIPES = {"alpaca_lora"}  # recipes beyond DESIGN's table, each checked by its own test below


def test_recipes_write_their_own_out_dir():
    # Two recipes with one out_dir: the second run is refused (another run's folder). The two 124M recipes are
    # the one pretraining run of nanoGPT's train_gpt2, on one GPU or eight.
    out_dirs = {}
    for name in recipe_names():
        out_dirs.setdefault(resolve_config(["--recipe", name])[0].out_dir, []).append(name)
    shared = {d: names for d, names in out_dirs.items() if len(names) > 1}
    assert shared == {"out-gpt2-124m": ["gpt2_124m_multi_gpu", "gpt2_124m_single_gpu"]}


def test_every_recipe_file_is_in_the_table():
    assert sorted(p.stem for p in RECIPES_DIR.glob("*.py")) == sorted([*DESIGN_TABLE, *EXTRA_RECIPES])


def test_alpaca_lora_recipe():
    # issue 6: gpt2-medium, LoRA, lr 1e-4 with warmup and cosine decay, weight decay 0.01-0.1, ~3 epochs
    cfg, _ = resolve_config(["--recipe", "alpaca_lora"])
    assert (cfg.init_from, cfg.mode, cfg.dataset, cfg.out_dir) == (
        "gpt2-medium", "lora", "alpaca", "out-alpaca-lora")
    assert cfg.learning_rate == 1e-4 and cfg.decay_lr and 0 < cfg.warmup_iters and cfg.min_lr < 1e-4
    assert 0.01 <= cfg.weight_decay <= 0.1
    assert cfg.max_epochs == 3  # max_iters and lr_decay_iters come from the dataset's size
    assert cfg.always_save_checkpoint is False and cfg.block_size == 1024
    assert set(cfg.lora_targets) == {"c_attn", "c_proj", "c_fc"}


def test_char_recipes_shapes():
    cfg, _ = resolve_config(["--recipe", "shakespeare_char"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (6, 6, 384, 256, 0.2)
    cfg, _ = resolve_config(["recipes/shakespeare_char_cpu.py"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout) == (4, 4, 128, 64, 0.0)


def test_overrides_positional_recipe_and_both_forms():
    cfg, _ = resolve_config(["recipes/gpt2_small.py", "--learning_rate=1e-5", "--max_iters=100",
                             "--mode", "lora", "--zero_stage=2", "--lora_targets=['c_attn']"])
    assert cfg.learning_rate == 1e-5 and cfg.max_iters == 100
    assert cfg.mode == "lora" and cfg.zero_stage == 2 and cfg.lora_targets == ["c_attn"]
    # an int where a float is expected widens; strings need no quotes
    cfg, _ = resolve_config(["--learning_rate=1", "--out_dir=my-run"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.out_dir == "my-run"
    assert resolve_config([])[0] == Config()


@pytest.mark.parametrize("args, message", [
    (["--learnin_rate=1e-4"], "did you mean learning_rate"),
    (["--max_iters=1.5"], "max_iters=1.5 in override --max_iters=1.5 must be of type int"),
    (["--decay_lr=yes"], "must be of type bool"),
    (["--mode=fast"], "must be one of auto, full, lora, qlora"),
    (["--zero_stage=4"], "must be one of auto, 0, 1, 2, 3"),
    (["--lora_targets=['q_proj']"], "choose from 'c_attn', 'c_proj', 'c_fc'"),
    (["--recipe", "gpt2_smal"], "did you mean gpt2_small"),
    (["--recipe", "no/such/recipe.py"], "does not exist"),
    (["learning_rate=3"], "write overrides as --learning_rate=3"),
])
def test_bad_overrides_name_the_problem(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve_config(args)


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("batch_size = 4\nlearning_rte = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rte' in recipe .*did you mean learning_rate"):
        resolve_config([str(recipe)])


@pytest.mark.parametrize("args, message", [
    (["--batch_size=0"], "batch_size=0 in override --batch_size=0 must be 1 or more"),
    (["--block_size=-8"], "block_size=-8 in override --block_size=-8 must be 1 or more"),
    (["--gradient_accumulation_steps=0"], "must be 1 or more"),
    (["--n_layer=0"], "n_layer=0 in override --n_layer=0 must be 1 or more"),
    (["--learning_rate=0"], "learning_rate=0.0 in override --learning_rate=0 must be more than 0"),
    (["--learning_rate=-1e-4"], "must be more than 0"),
    (["--min_lr=-1e-5"], "min_lr=-1e-05 in override --min_lr=-1e-5 must be 0.0 or more"),
    (["--max_iters=-1"], "max_iters=-1 in override --max_iters=-1 must be 0 or more"),
    (["--eval_interval=0"], "eval_interval=0 in override --eval_interval=0 must be 1 or more"),
    (["--eval_iters=0"], "must be 1 or more"),
    (["--log_interval=0"], "must be 1 or more"),
    (["--max_bad_steps=0"], "must be 1 or more"),
    (["--lora_r=0"], "lora_r=0 in override --lora_r=0 must be 1 or more"),
    (["--lora_alpha=-16"], "must be 1 or more"),
    (["--lora_dropout=1.0"], "lora_dropout=1.0 in override --lora_dropout=1.0 must be in [0.0, 1.0)"),
    (["--dropout=-0.1"], "must be in [0.0, 1.0)"),
    (["--beta2=1.5"], "beta2=1.5 in override --beta2=1.5 must be in [0.0, 1.0)"),
    (["--weight_decay=-0.1"], "must be 0.0 or more"),
    (["--grad_clip=-1.0"], "must be 0.0 or more"),
    (["--warmup_iters=-5"], "must be 0 or more"),
    (["--micro_batch_size=0"], "micro_batch_size=0 in override --micro_batch_size=0 must be 1 or more"),
    (["--sample_max_new_tokens=-1"], "must be 0 or more"),
    (["--seed=-1"], "seed=-1 in override --seed=-1 must be 0 or more"),
    (["--out_dir="], "out_dir='' in override --out_dir= must be a folder path"),
    (["--n_embd=100", "--n_head=3"], "n_embd=100 in the overrides must be a multiple of n_head=3"),
    (["--neftune_alpha=-5"], "neftune_alpha=-5.0 in override --neftune_alpha=-5 must be 0.0 or more"),
    (["--loraplus_lr_ratio=0"], "loraplus_lr_ratio=0.0 in override --loraplus_lr_ratio=0 must be more than 0.0"),
    (["--lora_init=loftq"], "lora_init='loftq' in override --lora_init=loftq must be one of default, pissa, olora"),
    # invalid combinations of the LoRA variants, each one line with the fix
    (["--use_dora=True"], "use_dora=True in the overrides needs mode=lora (the planner could choose full or qlora); "
                          "add --mode=lora"),
    (["--use_dora=True", "--mode=qlora"], "use_dora=True in the overrides needs mode=lora (on a 4-bit base peft's "
                                          "DoRA dequantizes every adapted weight in each pass"),
    (["--lora_init=pissa", "--init_from=gpt2"], "lora_init=pissa in the overrides rewrites the base weights as it "
                                                "starts the adapters, which needs mode=lora (the planner could choose "
                                                "full or qlora); add --mode=lora, or use --lora_init=default"),
    (["--lora_init=olora", "--mode=qlora", "--init_from=gpt2"], "which needs mode=lora (a 4-bit base cannot keep "
                                                                "the rest of the weight exactly)"),
    (["--lora_init=pissa", "--mode=lora"], "lora_init=pissa in the overrides starts the adapters from pretrained "
                                           "weights, but init_from='scratch' has none; use --init_from=gpt2"),
])
def test_values_out_of_range_name_key_value_and_range(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(args)


def test_a_recipe_value_out_of_range_names_the_recipe(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("batch_size = 4\nlora_r = -2\n")
    with pytest.raises(ConfigError, match=re.escape(f"lora_r=-2 in recipe {recipe} must be 1 or more")):
        resolve_config([str(recipe)])


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder; choose another --out_dir"):
        resolve_config([f"--out_dir={tmp_path / 'taken'}"])


def test_every_recipe_is_within_range():
    for name in recipe_names():
        resolve_config(["--recipe", name])  # raises on any key out of range


def test_a_recipe_may_import_and_compute_like_nanogpts_config_files(tmp_path):
    """Only the resulting top-level names that are keys count: modules, functions, classes, _private names
    are ignored (nanoGPT's finetune config starts with `import time`)."""
    recipe = tmp_path / "finetune.py"
    recipe.write_text("import time\nimport math as _math\nfrom os import path\n\n"
                      "def tokens(batch, block):\n    return batch * block\n\n"
                      "class Notes:\n    pass\n\n"
                      "_per_gpu = 5\n"
                      "wandb_run_name = 'ft-' + str(time.time())\n"
                      "gradient_accumulation_steps = _per_gpu * 8\n"
                      "max_iters = int(_math.ceil(tokens(4, 256) / 100))\n"
                      "lora_targets = [t for t in ('c_attn', 'c_fc') if path.sep]\n")
    cfg, _ = resolve_config([str(recipe)])
    assert cfg.wandb_run_name.startswith("ft-") and float(cfg.wandb_run_name[3:]) > 0
    assert cfg.gradient_accumulation_steps == 40 and cfg.max_iters == 11
    assert cfg.lora_targets == ["c_attn", "c_fc"]
    assert not {"time", "path", "tokens", "Notes", "_per_gpu", "_math"} & set(cfg.to_dict())


def test_a_computed_name_that_is_not_a_key_is_still_a_typo(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("import time\nlearning_rte = 1e-3 * 2\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rte' in recipe .*did you mean learning_rate"):
        resolve_config([str(recipe)])


@pytest.mark.parametrize("spelling, ours", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"),
                                            ("bf16", "bf16")])
def test_nanogpts_dtype_spellings_are_ours(tmp_path, spelling, ours):
    assert resolve_config([f"--dtype={spelling}"])[0].dtype == ours
    recipe = tmp_path / "mine.py"
    recipe.write_text(f"dtype = '{spelling}'\n")
    assert resolve_config([str(recipe)])[0].dtype == ours
    with pytest.raises(ConfigError, match="dtype='float64' in override --dtype=float64 must be one of auto, bf16"):
        resolve_config(["--dtype=float64"])


def test_nanogpts_device_and_backend_are_accepted(tmp_path):
    recipe = tmp_path / "mine.py"
    recipe.write_text("device = 'cuda:0'\nbackend = 'nccl'\n")
    cfg, _ = resolve_config([str(recipe), "--device=cpu"])
    assert cfg.device == "cpu" and cfg.backend == "nccl"
    assert DEFAULTS["device"] == DEFAULTS["backend"] == ""  # not given: nothing is printed about them


def test_the_groups_check_their_fields_and_config_json_reads_back(tmp_path):
    import dataclasses
    import json

    from trainer.run.run_dir import RunDir
    cfg = Config(dtype="bfloat16", learning_rate=1)  # nanoGPT's spelling is ours; an int widens
    assert (cfg.dtype, cfg.learning_rate) == ("bf16", 1.0) and isinstance(cfg.learning_rate, float)
    with pytest.raises(ConfigError, match=re.escape("lora_r=0 in the config must be 1 or more")):
        dataclasses.replace(cfg, lora_r=0)
    with pytest.raises(AttributeError, match="the config has no key 'learnig_rate' \\(did you mean learning_rate"):
        cfg.learnig_rate = 1e-4
    # a run saved before a key existed, with a key this version no longer has ('packed')
    old = {k: v for k, v in DEFAULTS.items() if k not in ("use_dora", "lora_init")}
    (tmp_path / "config.json").write_text(json.dumps({**old, "packed": True, "mode": "lora"}))
    saved = RunDir(tmp_path).config()
    assert (saved.mode, saved.use_dora, saved.lora_init, saved.continued_from) == ("lora", False, "default", "")
    assert saved.to_dict() == {**DEFAULTS, "mode": "lora"}  # a run's own keys appear once it sets them
    assert dataclasses.replace(saved, continued_from="x").to_dict()["continued_from"] == "x"
