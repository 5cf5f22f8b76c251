"""Files never run code: a crafted meta.pkl (in a dataset folder, in a run folder) and a crafted checkpoint file
(whose object would touch a marker file when unpickled) are refused by every entry point that reads them, in
one line naming the file and what it holds, exit code 2, the marker never created and nothing written. nanoGPT's
own meta.pkl (dicts of strings and ints) still loads, and every file a real checkpoint holds loads as data.
"""
import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import REPO, copy_run, fails_cleanly, python, run_cmd, train_args
from trainer.data.meta import read_meta_file
from trainer.run import checkpoint, safe_load
from trainer.run.checkpoint_save import write_manifest


class TouchesMarker:
    """Unpickled, it runs `touch <marker>`: what a crafted file would do with a worse command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


SMALL = ("--n_layer=1", "--n_head=2", "--n_embd=32")


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A character run with one checkpoint (iteration 2)."""
    out = tmp_path_factory.mktemp("safe") / "run"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", "--eval_iters=1", *SMALL)), REPO)
    return out


def craft_checkpoint_file(run, name, marker):
    """Replace one file of the run's checkpoint with a crafted pickle, and its manifest entry with the crafted
    file's size and sha256 (whoever can change the files can change the manifest)."""
    folder = checkpoint.checkpoint_dir(run) / "iter0000002"
    torch.save({"module": {}, "payload": TouchesMarker(marker)}, folder / name)
    write_manifest(folder, {})
    assert checkpoint.check_manifest(folder) is None
    return folder / name


def test_every_file_of_a_real_checkpoint_loads_as_data(finished_run):
    folder = checkpoint.checkpoint_dir(finished_run) / "iter0000002"
    assert safe_load.check_folder(folder) is None
    rng = safe_load.load(folder / "rng_rank0.pt")  # numpy's RNG state: an ndarray of uint32
    assert set(rng) == {"python", "numpy", "torch", "cuda"} and rng["numpy"][1].dtype.name == "uint32"


def test_a_crafted_torch_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": TouchesMarker(marker)}, path)
    with pytest.raises(Exception, match=f"{path} holds posix.system, which is not checkpoint data"):
        safe_load.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rng_rank0.pt", "mp_rank_00_model_states.pt"])
@pytest.mark.parametrize("entry", ["sample", "eval", "export", "continue", "resume"])
def test_a_crafted_checkpoint_is_refused_by_every_reader(finished_run, data_dir, tmp_path, entry, name):
    if name != "rng_rank0.pt" and entry in ("eval", "export", "continue"):
        pytest.skip("one crafted file per reader; the model file is checked through sample and resume")
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "marker"
    crafted = craft_checkpoint_file(run, name, marker)
    commands = {
        "sample": [REPO / "launch/sample.py", f"--out_dir={run}", "--num_samples=1", "--max_new_tokens=2"],
        "eval": [REPO / "launch/eval.py", f"--out_dir={run}", f"--data_dir={data_dir}"],
        "export": [REPO / "launch/merge_adapter.py", f"--out_dir={run}", f"--export_dir={tmp_path / 'export'}"],
        "continue": train_args(data_dir, tmp_path / "new", f"--init_from={run}", "--max_iters=2"),
        "resume": train_args(data_dir, run, "--init_from=resume", "--max_iters=4", *SMALL),
    }
    # (a resume takes the out_dir's lock, which changes the folder's own time: its contents are watched)
    fails_cleanly(commands[entry], f"{crafted} holds posix.system, which is not checkpoint data",
                  watch=run if entry == "resume" else tmp_path)
    assert not marker.exists()


def crafted_meta(meta, marker):
    """The real vocabulary plus one crafted object, as the issue's shared dataset held."""
    return pickle.dumps({**meta, "extra": TouchesMarker(marker)})


def test_a_crafted_dataset_meta_pkl_is_refused_by_training(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "shakespeare_char", data / "shakespeare_char")
    meta_file = data / "shakespeare_char" / "meta.pkl"
    marker = tmp_path / "marker"
    meta_file.write_bytes(crafted_meta(read_meta_file(meta_file.parent, ""), marker))
    fails_cleanly(train_args(data, tmp_path / "out", "--max_iters=2"),
                  f"{meta_file} holds a Python object (posix.system), not a dataset's vocabulary", watch=tmp_path)
    assert not marker.exists()


def test_a_crafted_run_meta_pkl_is_refused_by_sample_and_eval(finished_run, data_dir, tmp_path):
    """A run from before meta.json carries meta.pkl: read by the same data-only unpickler."""
    run = copy_run(finished_run, tmp_path)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").unlink()
    marker = tmp_path / "marker"
    (run / "meta.pkl").write_bytes(crafted_meta(meta, marker))
    expected = f"{run / 'meta.pkl'} holds a Python object (posix.system)"
    fails_cleanly([REPO / "launch/sample.py", f"--out_dir={run}", "--num_samples=1"], expected, watch=tmp_path)
    fails_cleanly([REPO / "launch/eval.py", f"--out_dir={run}", f"--data_dir={data_dir}"], expected, watch=tmp_path)
    assert not marker.exists()


def test_nanogpts_meta_pkl_and_a_run_without_meta_json_still_load(finished_run, tmp_path):
    """nanoGPT's shakespeare_char meta.pkl: {'vocab_size': int, 'itos': {int: str}, 'stoi': {str: int}}; and a
    run's meta.json gives back the integer keys of its characters."""
    chars = sorted(set("hello world"))
    nanogpt_meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(nanogpt_meta))
    assert read_meta_file(tmp_path, "") == nanogpt_meta
    run_meta = read_meta_file(finished_run, "")
    assert (finished_run / "meta.json").is_file() and not (finished_run / "meta.pkl").exists()
    assert all(isinstance(i, int) for i in run_meta["itos"]) and run_meta["stoi"][run_meta["itos"][5]] == 5
