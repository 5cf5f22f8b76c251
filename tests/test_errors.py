"""Every bad input: one line naming the thing and the fix, exit code 2, no traceback, nothing written."""
import pickle
import shutil

import numpy as np
import pytest

from conftest import REPO, fails_cleanly, make_tiny_gpt2, python, run_cmd, train_args


@pytest.fixture()
def bad_data(data_dir, tmp_path):
    """A private copy of the character dataset to damage."""
    root = tmp_path / "data"
    shutil.copytree(data_dir / "shakespeare_char", root / "shakespeare_char")
    return root


def char_run(data, out, *extra):
    return train_args(data, out, "--max_iters=2", "--eval_iters=1", *extra)


def test_missing_dataset_folder(tmp_path):
    fails_cleanly(char_run(tmp_path / "nowhere", tmp_path / "out"),
                  f"dataset folder {tmp_path / 'nowhere' / 'shakespeare_char'} does not exist; prepare it first",
                  watch=tmp_path)


def test_a_data_mistake_is_found_before_torch_is_imported(tmp_path):
    """One process opens its data first: the mistake is one line without the 6-7 s of importing torch,
    transformers and DeepSpeed (`-X importtime` lists every module imported)."""
    proc = run_cmd(python("-X", "importtime", *char_run(tmp_path / "nowhere", tmp_path / "out")),
                   REPO, check=False)
    assert proc.returncode == 2 and "does not exist; prepare it first" in proc.stderr.splitlines()[-1]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "trainer.data" in imported and not {"torch", "transformers", "deepspeed"} & imported


def test_missing_bin(bad_data, tmp_path):
    (bad_data / "shakespeare_char" / "val.bin").unlink()
    fails_cleanly(char_run(bad_data, tmp_path / "out"), "val.bin is missing; run the dataset's prepare script again",
                  watch=tmp_path)


def test_bin_that_is_not_whole_tokens(bad_data, tmp_path):
    with open(bad_data / "shakespeare_char" / "train.bin", "ab") as f:
        f.write(b"\x00")
    fails_cleanly(char_run(bad_data, tmp_path / "out"), "not a whole number of uint16 tokens", watch=tmp_path)


def test_token_id_outside_the_vocabulary(bad_data, tmp_path):
    tokens = np.zeros(1000, dtype=np.uint16)
    tokens[500] = 200  # characters pad to 128 ids
    tokens.tofile(bad_data / "shakespeare_char" / "val.bin")
    fails_cleanly(char_run(bad_data, tmp_path / "out"), "val.bin holds token id 200, but the model's vocabulary "
                  "has 128 ids", watch=tmp_path)


def test_dataset_shorter_than_a_block(bad_data, tmp_path):
    np.arange(10, dtype=np.uint16).tofile(bad_data / "shakespeare_char" / "val.bin")
    fails_cleanly(char_run(bad_data, tmp_path / "out"), "has 10 tokens, fewer than block_size + 1 = 65",
                  watch=tmp_path)


def test_unreadable_meta(bad_data, tmp_path):
    (bad_data / "shakespeare_char" / "meta.pkl").write_bytes(b"not a pickle")
    fails_cleanly(char_run(bad_data, tmp_path / "out"), "meta.pkl is unreadable or has no vocab_size; "
                  "prepare the dataset again", watch=tmp_path)


def test_block_size_above_pretrained_positions(data_dir, tmp_path):
    model = tmp_path / "tiny"
    make_tiny_gpt2(model, n_positions=128)
    fails_cleanly(train_args(data_dir, tmp_path / "out", f"--init_from={model}", "--block_size=256",
                             "--max_iters=2", recipe="gpt2_small"),
                  "block_size=256 is larger than the model's 128 positions; use --block_size=128 or less",
                  watch=tmp_path / "out")


@pytest.mark.parametrize("args, expected", [
    (["--recipe", "gpt2_smal"], "unknown recipe 'gpt2_smal' (did you mean gpt2_small"),
    (["--recipe", "gpt2_small", "--learnin_rate=1e-4"], "unknown key 'learnin_rate' in override"),
    (["--recipe", "gpt2_small", "--max_iters=ten"], "max_iters='ten' in override --max_iters=ten must be of type int"),
    (["--recipe", "gpt2_small", "--mode=fast"], "must be one of auto, full, lora, qlora"),
])
def test_bad_recipe_or_override(tmp_path, args, expected):
    fails_cleanly([REPO / "launch/train.py", *args, f"--out_dir={tmp_path / 'out'}"], expected, watch=tmp_path)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A run with two checkpoints (iterations 2 and 4)."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
                               "--always_save_checkpoint=True", "--sample_max_new_tokens=0")), REPO)
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


@pytest.mark.slow
def test_out_dir_holding_another_run(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    fails_cleanly(char_run(data_dir, out), f"out_dir {out} already holds a run; resume it with --init_from=resume, "
                  "choose another --out_dir, or pass --overwrite=True to replace it", watch=out)


def test_resume_without_a_run(data_dir, tmp_path):
    (tmp_path / "out").mkdir()
    fails_cleanly(char_run(data_dir, tmp_path / "out", "--init_from=resume"),
                  "does not exist; start a new run without --init_from=resume", watch=tmp_path / "out")


@pytest.mark.slow
def test_resume_with_another_model_shape(data_dir, finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    fails_cleanly(char_run(data_dir, out, "--init_from=resume", "--n_layer=6"),
                  f"{out} holds a model with n_layer=4, but this run asks for n_layer=6", watch=out)


def test_hardware_too_small_for_any_plan(tmp_path):
    fails_cleanly([REPO / "launch/train.py", "--recipe", "gpt2_xl", "--plan", "--vram_gb=2", "--gpus=1"],
                  "fits", watch=tmp_path)


def test_sample_pointed_at_a_directory_with_no_run(tmp_path):
    fails_cleanly([REPO / "launch/sample.py", f"--out_dir={tmp_path}"],
                  f"{tmp_path} is not a training run (no config.json and model_config.json)", watch=tmp_path)


@pytest.mark.slow
def test_meta_pickle_written_by_nanogpt_is_accepted(bad_data, tmp_path):
    """nanoGPT's own shakespeare_char meta.pkl (no tokenizer key) is not an error."""
    meta_path = bad_data / "shakespeare_char" / "meta.pkl"
    meta = pickle.loads(meta_path.read_bytes())
    meta_path.write_bytes(pickle.dumps({k: meta[k] for k in ("vocab_size", "itos", "stoi")}))
    run_cmd(python(*char_run(bad_data, tmp_path / "out", "--sample_max_new_tokens=0")), REPO)


@pytest.mark.parametrize("args, expected", [
    (["launch/train.py", "--recipe", "shakespeare_char_cpu", "--plan", "--gpus=0"], "--gpus=0 must be 1 or more"),
    (["launch/train.py", "--recipe", "shakespeare_char_cpu", "--plan", "--vram_gb=-4"],
     "--vram_gb=-4 must be more than 0"),
    (["launch/train.py", "--recipe", "shakespeare_char_cpu", "--lora_r=0"], "lora_r=0 in override --lora_r=0 must be "
                                                                             "1 or more"),
    (["launch/sample.py", "--temperature=-0.5"], "--temperature=-0.5 must be 0.0 or more"),
    (["launch/sample.py", "--top_k=0"], "--top_k=0 must be 1 or more"),
    (["launch/sample.py", "--num_samples=abc"], "argument --num_samples: invalid int value: 'abc'"),
    (["launch/sample.py", "--input=Good morning"], "--input is the input of an instruction; add --prompt_template"),
    (["launch/eval.py", "--out_dir=x", "--batch_size=0"], "--batch_size=0 must be 1 or more"),
    (["launch/merge_adapter.py", "--out_dir=x", "--export_dir=y", "--tolerance=0"], "--tolerance=0.0 must be more "
                                                                                     "than 0.0"),
    (["launch/merge_adapter.py", "--out_dir=x"], "the following arguments are required: --export_dir"),
])
def test_flags_out_of_range_are_one_line_and_write_nothing(tmp_path, args, expected):
    fails_cleanly([REPO / args[0], *args[1:], f"--out_dir={tmp_path / 'out'}"] if args[0].endswith("train.py")
                  else [REPO / args[0], *args[1:]], expected, watch=tmp_path)


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    fails_cleanly(char_run(tmp_path, tmp_path / "out"), "is a file, not a folder; choose another --out_dir",
                  watch=tmp_path)
