"""Every model folder and run file that can be damaged is checked where it is read: one line naming the file
and the fix, exit code 2, nothing written, in every entry point that reads it (sample.py, eval.py,
train.py --init_from, merge_adapter.py). Damage is a file cut short, as a full disk or an interrupted copy
leaves it."""
import shutil

import pytest

from conftest import REPO, copy_run, fails_cleanly, make_tiny_gpt2, python, run_cmd, train_args

SMALL = ("--n_layer=1", "--n_head=2", "--n_embd=32", "--eval_iters=1")


def cut_short(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 saved by save_pretrained, with tokenizer files as an export writes them."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    make_tiny_gpt2(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return folder


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged-files") / "run"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", *SMALL)), REPO)
    return out


def entry_points(source, data_dir, tmp_path):
    return {
        "sample": [REPO / "launch/sample.py", f"--init_from={source}", "--num_samples=1", "--max_new_tokens=2"],
        "eval": [REPO / "launch/eval.py", f"--out_dir={source}", f"--data_dir={data_dir}"],
        "train": train_args(data_dir, tmp_path / "new", f"--init_from={source}", "--max_iters=2",
                            "--dataset=shakespeare"),
    }


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "generation_config.json",
                                  "tokenizer_config.json"])
@pytest.mark.parametrize("entry", ["sample", "eval", "train"])
def test_a_damaged_model_folder_is_one_line(model_dir, data_dir, tmp_path, name, entry):
    if name in ("generation_config.json", "tokenizer_config.json") and entry != "sample":
        pytest.skip("the folder is checked file by file in one place (trainer/model/model_files.py): sample "
                    "stands for the others on these files")
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cut_short(folder / name)
    expected = f"{folder / name} is not valid JSON" if name == "config.json" else f"{folder / name} is damaged"
    fails_cleanly(entry_points(folder, data_dir, tmp_path)[entry], expected, watch=tmp_path)


@pytest.mark.parametrize("name", ["config.json", "plan.json", "meta.json", "model_config.json"])
@pytest.mark.parametrize("entry", ["sample", "eval", "export", "train"])
def test_a_damaged_run_file_is_one_line(finished_run, data_dir, tmp_path, name, entry):
    if name != "config.json" and entry in ("eval", "train"):
        pytest.skip("every run file is read through trainer/run/run_dir.py: config.json stands for them here")
    run = copy_run(finished_run, tmp_path)
    cut_short(run / name)
    commands = {**entry_points(run, data_dir, tmp_path),
                "sample": [REPO / "launch/sample.py", f"--out_dir={run}", "--num_samples=1", "--max_new_tokens=2"],
                "export": [REPO / "launch/merge_adapter.py", f"--out_dir={run}", f"--export_dir={tmp_path / 'exp'}"],
                "train": train_args(data_dir, tmp_path / "new", f"--init_from={run}", "--max_iters=2")}
    expected = (f"{run / name} is unreadable or has no vocab_size; restore it from a copy of the run"
                if name == "meta.json" else f"{run / name} is damaged")
    fails_cleanly(commands[entry], expected, watch=tmp_path)
