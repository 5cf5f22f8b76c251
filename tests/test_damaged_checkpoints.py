"""Checkpoints verified by content: every kind of damage is found, the newest good checkpoint is taken with one
line saying what was passed over and why, the damaged one is never deleted, and a damaged --resume_tag is
refused with the list of good tags.

One module run (checkpoints at iterations 2 and 4), copied per kind of damage; the selection is checked where it
happens (trainer/run/checkpoint.py, as resume, export, sample and eval call it), and two launches check it end
to end: a resume that falls back, and a refused resume that writes nothing.
"""
import json
import shutil

import pytest
import torch

from conftest import REPO, fails_cleanly, python, run_cmd, snapshot, train_args
from trainer.errors import UserError
from trainer.run import checkpoint, consolidate

NEWEST, OLDER = "iter0000004", "iter0000002"
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A run with two checkpoints (iterations 2 and 4)."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
                               "--always_save_checkpoint=True")), REPO)
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def flip_one_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the content check can see it
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])  # a torn write


# kind of damage -> (what is done to the checkpoints folder, the tag taken, what the warning says)
DAMAGE = {
    "same-size bit flip": (lambda root: flip_one_bit(root / NEWEST / MODEL_FILE), OLDER,
                           f"{NEWEST} is damaged ({MODEL_FILE} does not match its sha256 in manifest.json)"),
    "truncation": (lambda root: truncate(root / NEWEST / MODEL_FILE), OLDER,
                   f"{NEWEST} is damaged ({MODEL_FILE} has 1000 bytes, not"),
    "missing file": (lambda root: (root / NEWEST / "rng_rank0.pt").unlink(), OLDER,
                     f"{NEWEST} is damaged (rng_rank0.pt is missing)"),
    "missing folder": (lambda root: shutil.rmtree(root / NEWEST), OLDER,
                       f"{NEWEST}, which {{root}}/latest names, is missing"),
    "damaged manifest": (lambda root: (root / NEWEST / "manifest.json").write_text('{"format": 2, "files": {'), OLDER,
                         f"{NEWEST} is damaged (its manifest.json is damaged)"),
    "damaged latest": (lambda root: (root / "latest").write_bytes(b"\x00\xff garbage"), NEWEST,
                       "{root}/latest is damaged"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_is_found_and_passed_over(finished_run, tmp_path, capsys, kind):
    out = copy_run(finished_run, tmp_path)
    root = checkpoint.checkpoint_dir(out)
    damage, expected_tag, what = DAMAGE[kind]
    damage(root)
    before = snapshot(root)
    verb = "resuming from"
    for chosen in (checkpoint.choose_tag, checkpoint.latest_tag_or_error):  # resume; export, sample and eval
        assert chosen(out) == expected_tag
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("warning: ") and what.format(root=root) in line, line
        assert line.endswith(f"{verb} {expected_tag} instead (nothing was deleted)"), line
        verb = "using"
    assert snapshot(root) == before, "choosing a checkpoint changed files"


def test_a_damaged_resume_tag_is_refused_with_the_good_tags(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    flip_one_bit(checkpoint.checkpoint_dir(out) / NEWEST / MODEL_FILE)
    with pytest.raises(UserError) as refused:
        checkpoint.choose_tag(out, NEWEST)
    assert str(refused.value) == (
        f"resume_tag='{NEWEST}': checkpoint {out}/checkpoints/{NEWEST} is damaged ({MODEL_FILE} does not match its "
        f"sha256 in manifest.json) and kept as it is; the good checkpoints are {OLDER}: choose one with "
        f"--resume_tag, or leave --resume_tag out to resume from the newest good one")
    assert checkpoint.choose_tag(out, OLDER) == OLDER


def test_no_intact_checkpoint_is_one_line_and_keeps_them(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    root = checkpoint.checkpoint_dir(out)
    flip_one_bit(root / NEWEST / MODEL_FILE)
    truncate(root / OLDER / MODEL_FILE)
    before = snapshot(root)
    with pytest.raises(UserError, match=f"no checkpoint in {root} is intact \\(checkpoint {root / NEWEST} is damaged"):
        checkpoint.choose_tag(out)
    with pytest.raises(UserError, match="they are kept as they are"):
        checkpoint.latest_tag_or_error(out)
    assert snapshot(root) == before


def test_readers_load_the_checkpoint_that_verifies(finished_run, tmp_path):
    """Export, sample.py and eval.py read weights through consolidated_state_dict: the older, intact ones."""
    out = copy_run(finished_run, tmp_path)
    flip_one_bit(checkpoint.checkpoint_dir(out) / NEWEST / MODEL_FILE)
    weights = consolidate.consolidated_state_dict(out)
    older = consolidate.consolidated_state_dict(finished_run, OLDER)
    assert weights.keys() == older.keys() and all(torch.equal(weights[k], older[k]) for k in weights)


def test_a_format_1_manifest_checks_sizes(finished_run, tmp_path):
    """Checkpoints saved before checksums (manifest {name: bytes}) still load, and truncation is still found."""
    out = copy_run(finished_run, tmp_path)
    folder = checkpoint.checkpoint_dir(out) / NEWEST
    entries = json.loads((folder / "manifest.json").read_text())["files"]
    (folder / "manifest.json").write_text(json.dumps({name: e["bytes"] for name, e in entries.items()}))
    assert checkpoint.check_manifest(folder) is None
    truncate(folder / MODEL_FILE)
    assert checkpoint.check_manifest(folder).startswith(f"{MODEL_FILE} has 1000 bytes")


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_good_checkpoint(data_dir, finished_run, tmp_path):
    """End to end: one warning line, the resume from iteration 2, the damaged checkpoint kept beside the new
    saves, and moved aside (not deleted) when a save reaches its iteration again."""
    out = copy_run(finished_run, tmp_path)
    root = checkpoint.checkpoint_dir(out)
    flip_one_bit(root / NEWEST / MODEL_FILE)
    damaged = snapshot(root / NEWEST)
    proc = run_cmd(python(*train_args(data_dir, out, "--init_from=resume", "--max_iters=4", "--eval_interval=3",
                                      "--eval_iters=1", "--always_save_checkpoint=True")), REPO)
    skipped, moved = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert skipped == (f"warning: checkpoint {root / NEWEST} is damaged ({MODEL_FILE} does not match its sha256 in "
                       f"manifest.json): resuming from {OLDER} instead (nothing was deleted)")
    assert "resumed from iteration 2" in proc.stdout
    (aside,) = root.glob(f"{NEWEST}.damaged-*")
    assert moved == (f"warning: the damaged checkpoint {root / NEWEST} ({MODEL_FILE} does not match its sha256 in "
                     f"manifest.json) was moved aside to {aside}")
    assert snapshot(aside) == damaged  # never deleted, nor changed
    assert checkpoint.complete_tags(out) == ["iter0000003", NEWEST] and checkpoint.latest_tag(out) == NEWEST
    assert checkpoint.check_manifest(root / NEWEST) is None  # the new save of iteration 4


@pytest.mark.slow
def test_a_resume_that_fails_while_loading_writes_nothing(data_dir, finished_run, tmp_path):
    """A checkpoint whose manifest holds sizes only (saved before checksums) and whose model file is readable
    data of the same size, but not what DeepSpeed saved, passes the checks and does not load: the resume stops
    after the engine and the logger were made, and leaves the out_dir as it was (no empty TensorBoard event
    file, no run file rewritten). A model file that cannot be parsed at all is found by the check of its
    contents (trainer/run/safe_load.check_folder) and passed over like any other damage."""
    out = copy_run(finished_run, tmp_path)
    folder = checkpoint.checkpoint_dir(out) / NEWEST
    entries = json.loads((folder / "manifest.json").read_text())["files"]
    unparsable = bytearray((folder / MODEL_FILE).read_bytes())
    unparsable[:64] = bytes(64)  # the zip header: unreadable, same size
    torch.save({"module": {}}, folder / MODEL_FILE)  # data, but no weights: DeepSpeed's load fails
    sizes = {name: e["bytes"] for name, e in entries.items()}
    (folder / "manifest.json").write_text(json.dumps({**sizes, MODEL_FILE: (folder / MODEL_FILE).stat().st_size}))
    fails_cleanly(train_args(data_dir, out, "--init_from=resume"),
                  f"the previous good checkpoint is {OLDER}: resume from it with --resume_tag={OLDER}", watch=out)
    (folder / MODEL_FILE).write_bytes(bytes(unparsable))
    (folder / "manifest.json").write_text(json.dumps(sizes))
    assert checkpoint.problem_with(folder).startswith(f"{MODEL_FILE} cannot be loaded")
    assert checkpoint.newest_good(out)[0] == OLDER
