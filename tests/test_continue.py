"""`--init_from=<a run's out_dir>`: a new run from that run's latest (best) checkpoint, on any dataset.

A new run evaluated at iteration 0 on the source's own data, windows and block size gives exactly the
val loss the source had at its last checkpoint: the weights (or kept adapters) are the source's. Merged
adapters agree to float rounding. Another dataset trains from iteration 0 with a fresh optimizer.
"""
import json
import re
import shutil
from dataclasses import replace

import pytest

from conftest import REPO, python, run_cmd, train_args
from test_train_e2e import val_losses

pytestmark = pytest.mark.slow  # launches training runs

SHORT = ["--max_iters=4", "--eval_interval=4", "--eval_iters=2", "--always_save_checkpoint=True"]
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32"]


@pytest.fixture(scope="module")
def data(data_dir, tmp_path_factory):
    """The session's datasets, and a second one of each vocabulary (the same tokens, train and val swapped)."""
    root = tmp_path_factory.mktemp("data2")
    for name in ("shakespeare_char", "shakespeare"):
        shutil.copytree(data_dir / name, root / name)
        other = root / f"{name}_b"
        other.mkdir()
        shutil.copy(data_dir / name / "meta.pkl", other)
        shutil.copy(data_dir / name / "train.bin", other / "val.bin")
        shutil.copy(data_dir / name / "val.bin", other / "train.bin")
    return root


def train(data, out_dir, *extra, check=True):
    return run_cmd(python(*train_args(data, out_dir, *extra)), cwd=REPO, check=check)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = train(data, out, *SHORT, *TINY)
    return out, val_losses(proc.stdout)


@pytest.fixture(scope="module")
def lora_run(data, tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    proc = train(data, out, *SHORT, "--mode=lora", f"--init_from={tiny_gpt2_dir}", "--dataset=shakespeare",
                 "--learning_rate=1e-2")
    return out, val_losses(proc.stdout)


def config(out):
    return json.loads((out / "config.json").read_text())


def test_a_full_run_continues_with_its_weights(data, full_run, tmp_path):
    source, losses = full_run
    proc = train(data, tmp_path / "same", f"--init_from={source}", "--eval_only=True", *SHORT)
    assert val_losses(proc.stdout)[0] == losses[4]  # the same weights on the same windows
    assert f"init_from={source}: a new run from {source} (iter0000004, full mode): its weights" in proc.stdout
    cfg = config(tmp_path / "same")
    assert cfg["continued_from"] == str(source) and cfg["init_from"] == str(source) and cfg["mode"] == "full"


def test_a_full_run_continues_on_another_dataset_from_iteration_0(data, full_run, tmp_path):
    source, _ = full_run
    proc = train(data, tmp_path / "b", f"--init_from={source}", "--dataset=shakespeare_char_b", "--max_iters=2",
                 "--eval_interval=2", "--eval_iters=2", "--warmup_iters=0", "--log_interval=1")
    assert "the optimizer, iteration count and learning-rate schedule start fresh on dataset 'shakespeare_char_b'" \
        in proc.stdout
    assert re.search(r"iter 1/2: loss [\d.]+, lr 1\.00e-03", proc.stdout)  # the schedule from its start
    assert (tmp_path / "b" / "checkpoints" / "iter0000002").is_dir()
    assert json.loads((tmp_path / "b" / "model_config.json").read_text())["n_layer"] == 2  # the source's shape
    # and that run resumes like any other, still recording where its weights came from
    proc = train(data, tmp_path / "b", "--init_from=resume", "--dataset=shakespeare_char_b", "--max_iters=3",
                 "--eval_interval=2", "--eval_iters=2")
    assert "resumed from iteration 2" in proc.stdout and config(tmp_path / "b")["continued_from"] == str(source)


def test_a_lora_run_keeps_its_adapters_or_merges_them(data, lora_run, tiny_gpt2_dir, tmp_path):
    source, losses = lora_run
    common = ["--dataset=shakespeare", "--eval_only=True", *SHORT]
    kept = train(data, tmp_path / "keep", f"--init_from={source}", *common)
    assert val_losses(kept.stdout)[0] == losses[4]
    assert "its lora adapters (r=8, targets c_attn, c_proj, c_fc) on its base" in kept.stdout
    cfg = config(tmp_path / "keep")
    assert cfg["mode"] == "lora" and cfg["init_from"] == str(tiny_gpt2_dir) and cfg["continued_from"] == str(source)
    merged = train(data, tmp_path / "merge", f"--init_from={source}", "--init_adapters=merge", *common)
    assert abs(val_losses(merged.stdout)[0] - losses[4]) <= 2e-4  # merged in fp32: rounding only
    assert "its base with the adapters merged in" in merged.stdout and config(tmp_path / "merge")["mode"] == "full"


def test_kept_adapters_train_further_on_another_dataset(data, lora_run, tmp_path):
    source, _ = lora_run
    proc = train(data, tmp_path / "b", f"--init_from={source}", "--dataset=shakespeare_b", "--max_iters=2",
                 "--eval_interval=2", "--eval_iters=2", "--learning_rate=1e-2")
    losses = val_losses(proc.stdout)
    assert losses[2] < losses[0] and "lora" in (tmp_path / "b" / "plan.json").read_text()


def test_resume_with_another_dataset_names_the_command_that_continues(data, full_run, tmp_path):
    source, _ = full_run
    shutil.copytree(source, tmp_path / "run")
    proc = train(data, tmp_path / "run", "--init_from=resume", "--dataset=shakespeare_char_b", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run'} trained on dataset='shakespeare_char' and a resume continues the same run on the "
        f"same data, but this run asks for dataset='shakespeare_char_b'; to continue its model on other data, start "
        f"a new run from it: --init_from={tmp_path / 'run'} --out_dir=<a new folder> --dataset='shakespeare_char_b'")


def test_refusals_are_one_line(data, full_run, lora_run, tmp_path):
    """Checked where the setup checks them, before anything is written."""
    from trainer.config import Config
    from trainer.data.tokens import TokenData
    from trainer.errors import UserError
    from trainer.run.continuation import check_vocabulary, continue_run
    full, lora = full_run[0], lora_run[0]
    cfg = Config(out_dir=str(tmp_path / "new"))
    with pytest.raises(UserError, match="but out_dir is the same folder; choose another --out_dir"):
        continue_run(replace(cfg, init_from=str(full), out_dir=str(full)))
    with pytest.raises(UserError, match="trains its whole model \\(mode full\\), not mode=lora; to train adapters on "
                                        "it, export it first \\(python launch/merge_adapter.py"):
        continue_run(replace(cfg, init_from=str(full), mode="lora"))
    with pytest.raises(UserError, match="init_adapters='keep' trains the lora adapters of .* but this run asks for "
                                        "mode=full; leave --mode unset, or pass --init_adapters=merge"):
        continue_run(replace(cfg, init_from=str(lora), mode="full"))
    with pytest.raises(UserError, match="holds a model with lora_r=8, but this run asks for lora_r=4"):
        continue_run(replace(cfg, init_from=str(lora), lora_r=4))
    start = continue_run(replace(cfg, init_from=str(full)))
    with pytest.raises(UserError, match="was trained on the char vocabulary \\(65 ids\\), but shakespeare is prepared "
                                        "with the gpt2 one \\(50257 ids\\); prepare the data with the model's"):
        check_vocabulary(start, TokenData(data / "shakespeare", 64))
    scratch = tmp_path / "scratch-lora"
    shutil.copytree(lora, scratch)
    (scratch / "config.json").write_text(json.dumps({**config(lora), "init_from": "scratch"}))
    with pytest.raises(UserError, match="trained adapters on a from-scratch base.*--init_adapters=merge"):
        continue_run(replace(cfg, init_from=str(scratch)))
