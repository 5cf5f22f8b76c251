"""`--plan`, `--plan --json` and a plan that cannot fit, through the real command line.

The recipe gpt2_xl starts from the hub's gpt2-xl, which the tests cannot download (HF_HUB_OFFLINE),
and --data_dir points at an empty folder: --plan answering at all shows it loads neither.
"""
import json
import re
import time

import pytest

from conftest import REPO, python, run_cmd, train_args

from trainer.plan.memory import MEMORY_ITEMS

PLAN_XL_24 = [REPO / "launch/train.py", "--recipe", "gpt2_xl", "--plan", "--vram_gb=24", "--gpus=1"]


def test_plan_prints_keys_memory_table_and_reasons(tmp_path):
    start = time.time()
    proc = run_cmd(python(*PLAN_XL_24, f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"), cwd=REPO)
    assert time.time() - start < 60  # seconds, not the minutes that loading gpt2-xl would take
    out = proc.stdout
    assert out.startswith("plan for GPU with 24 GB (--vram_gb) (cuda, 1 rank)")
    for key in ("mode", "zero_stage", "offload", "gradient_checkpointing", "micro_batch_size", "dtype"):
        assert f"\n  {key} " in out, key
    for item in MEMORY_ITEMS + ("peak", "usable"):
        assert f"\n  {item} " in out, item
    assert "usable = 95% of 24.00 GiB per GPU" in out
    assert "\n  tokens per iteration    8,192 (8 sequences of 1024)" in out and "\n  parameters " in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_plan_json_is_one_object_for_scripts(tmp_path):
    proc = run_cmd(python(*PLAN_XL_24, "--json", f"--data_dir={tmp_path}"), cwd=REPO)
    plan = json.loads(proc.stdout)  # the whole output is one JSON object
    assert plan["fits"] is True and plan["total_bytes"] <= plan["usable_bytes"] == int(0.95 * 24 * 2**30)
    assert set(MEMORY_ITEMS) <= set(plan["memory"])
    assert plan["params_total"] >= plan["params_trainable"] > 0
    assert plan["micro_batch_size"] * plan["grad_accum_per_rank"] == 8  # the recipe's 1 x 8 sequences
    assert plan["mode"] in ("full", "lora", "qlora") and set(plan["reasons"]) >= {"mode", "zero_stage", "budget"}


def test_training_that_cannot_fit_stops_before_loading_anything(data_dir, tmp_path):
    """Through the training path (not --plan): one error line naming the memory that would fit, exit 2."""
    out_dir = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out_dir, "--init_from=gpt2-xl", "--block_size=1024",
                                      "--vram_gb=2", "--gpus=1", recipe="gpt2_xl")), cwd=REPO, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: nothing fits in 1.90 GiB usable per GPU"), last
    assert "i.e. at least" in last and "per GPU; options:" in last and "Traceback" not in proc.stderr
    assert not (out_dir / "config.json").exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_tells_every_key_recipe_and_flag(flag):
    from trainer.config import KEYS, recipe_names
    proc = run_cmd(python(REPO / "launch/train.py", "--recipe", "gpt2_xl", flag), cwd=REPO)
    text = proc.stdout
    assert text.startswith("usage: deepspeed [--num_gpus N] launch/train.py --recipe NAME")
    for name, key in KEYS.items():  # each key with its default, valid values and meaning
        assert f"  --{name}={key.default!r}  [" in text and key.meaning in text, name
    assert "  --micro_batch_size='auto'  [auto, or 1 or more]" in text
    assert "  --mode='auto'  [one of auto, full, lora, qlora]" in text
    for name in recipe_names():
        assert re.search(rf"^  {name} +\S", text, re.M), name
    for flag_name in ("--plan", "--json", "--vram_gb=GB", "--gpus=N"):
        assert f"  {flag_name} " in text
    assert "exit code 2" in text and proc.stderr.strip() == ""
