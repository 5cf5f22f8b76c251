"""What the operating system refuses, in prepare, train, sample, eval and export: one line naming the path and
the reason, exit code 2, nothing already written lost.

Real refusals: permission bits (CI runs as root, so the command runs without the capabilities that bypass them,
through util-linux's setpriv; skipped where that cannot be done), small tmpfs mounts for a full disk and a
read-only filesystem (skipped where the test cannot mount one), and RLIMIT_NOFILE for too many open files.
"""
import os
import resource
import shutil
import subprocess

import pytest

from conftest import REPO, SHAKESPEARE, fails_cleanly, python, run_cmd, snapshot, train_args
from trainer.run import checkpoint

DENIED = "Permission denied; give this user access to it"
NO_SPACE = "No space left on device; free disk space there"


@pytest.fixture(scope="module")
def unprivileged():
    """The prefix that runs a command bound by permission bits: as root, without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (dropped from the bounding set, so the exec'd process cannot have them)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root and cannot drop the capability that bypasses permission bits (setpriv)")
    return prefix


@pytest.fixture()
def small_disk(tmp_path):
    """mount(size_bytes, read_only=False) -> a fresh tmpfs folder; unmounted after the test."""
    mounted = []

    def mount(size, read_only=False):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def prepare_args(data_dir, *extra, source=SHAKESPEARE):
    return [REPO / "data/prepare.py", f"--input={source}", "--name=ds", f"--data_dir={data_dir}", *extra]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A run with one checkpoint (iteration 2), world-readable so that a command without privileges reads it."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                               "--always_save_checkpoint=True")), REPO)
    return out


def copy_of(folder, tmp_path, name="out"):
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- permission

def test_prepare_an_unreadable_input_file(tmp_path, unprivileged):
    text = tmp_path / "notes.txt"
    shutil.copy(SHAKESPEARE, text)
    text.chmod(0)
    fails_cleanly(None, f"error: {text}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(*prepare_args(tmp_path / "data", source=text))])


def test_prepare_an_unreadable_input_folder(tmp_path, unprivileged):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(SHAKESPEARE, corpus / "a.txt")
    corpus.chmod(0)
    fails_cleanly(None, f"error: {corpus}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(*prepare_args(tmp_path / "data", source=corpus))])


def test_prepare_into_a_read_only_dataset_folder_keeps_the_dataset(tmp_path, unprivileged):
    run_cmd(python(*prepare_args(tmp_path / "data", "--tokenizer=char")), REPO)
    dataset = tmp_path / "data" / "ds"
    dataset.chmod(0o555)
    fails_cleanly(None, f"error: {dataset / '.lock'}: {DENIED}", watch=dataset,
                  command=[*unprivileged, *python(*prepare_args(tmp_path / "data", "--tokenizer=char"))])


def test_train_on_an_unreadable_dataset(data_dir, tmp_path, unprivileged):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "shakespeare_char", data / "shakespeare_char")
    (data / "shakespeare_char" / "train.bin").chmod(0)
    fails_cleanly(None, f"error: {data / 'shakespeare_char' / 'train.bin'}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(*train_args(data, tmp_path / "out", "--max_iters=2"))])


def test_train_into_a_read_only_out_dir(data_dir, tmp_path, unprivileged):
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    fails_cleanly(None, f"error: {out / '.lock'}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(*train_args(data_dir, out, "--max_iters=2"))])


@pytest.mark.slow
def test_sample_an_unreadable_checkpoint(finished_run, tmp_path, unprivileged):
    out = copy_of(finished_run, tmp_path)
    model_file = out / "checkpoints" / "iter0000002" / "mp_rank_00_model_states.pt"
    model_file.chmod(0)
    fails_cleanly(None, f"error: {model_file}: {DENIED}", watch=out,
                  command=[*unprivileged, *python(REPO / "launch/sample.py", f"--out_dir={out}", "--device=cpu")])


def test_eval_an_unreadable_text(finished_run, tmp_path, unprivileged):
    text = tmp_path / "text.txt"
    shutil.copy(SHAKESPEARE, text)
    text.chmod(0)
    fails_cleanly(None, f"error: {text}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(REPO / "launch/eval.py", f"--out_dir={finished_run}",
                                                  f"--text={text}")])


@pytest.mark.slow
def test_export_into_a_read_only_folder(finished_run, tmp_path, unprivileged):
    exports = tmp_path / "exports"
    exports.mkdir(mode=0o555)
    fails_cleanly(None, f"error: {exports / '.x.lock'}: {DENIED}", watch=tmp_path,
                  command=[*unprivileged, *python(REPO / "launch/merge_adapter.py", f"--out_dir={finished_run}",
                                                  f"--export_dir={exports / 'x'}")])


# ---------------------------------------------------------------- a read-only filesystem, a full disk

def test_train_on_a_read_only_filesystem(data_dir, small_disk):
    disk = small_disk(1 << 20, read_only=True)
    fails_cleanly(train_args(data_dir, disk / "out", "--max_iters=2"),
                  f"error: {disk / 'out'}: Read-only file system; that filesystem is mounted read-only")


def test_prepare_on_a_full_disk_keeps_the_previous_dataset(tmp_path, small_disk):
    disk = small_disk(3_400_000)  # room for one character dataset of tiny Shakespeare (2.2 MB), not two
    run_cmd(python(*prepare_args(disk, "--tokenizer=char")), REPO)
    line = fails_cleanly(prepare_args(disk, "--tokenizer=char", "--chunk_bytes=65536"), NO_SPACE.split(";")[0],
                         watch=disk / "ds")
    assert line.startswith(f"error: could not write {disk / 'ds'}/.train.bin.") and "the previous dataset is kept" in line


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(data_dir, finished_run, small_disk):
    folder = checkpoint.checkpoint_dir(finished_run) / "iter0000002"
    run_bytes = sum(p.stat().st_size for p in finished_run.rglob("*") if p.is_file())
    # room for the run and its small files, not for a second checkpoint
    disk = small_disk(run_bytes + checkpoint.folder_bytes(folder) // 2)
    out = copy_of(finished_run, disk)
    before = snapshot(out / "checkpoints")
    line = fails_cleanly(train_args(data_dir, out, "--init_from=resume", "--max_iters=4", "--eval_interval=2",
                                    "--eval_iters=1", "--always_save_checkpoint=True"),
                         f"error: could not save the checkpoint of iteration 4 ({out}/checkpoints/.tmp-iter0000004/")
    assert (f": No space left on device); the previous checkpoint {out / 'checkpoints' / 'iter0000002'} is intact; "
            f"free disk space there") in line and line.endswith("then continue with --init_from=resume")
    assert snapshot(out / "checkpoints") == before


def test_an_export_onto_a_full_disk_leaves_nothing(finished_run, small_disk):
    from trainer.os_errors import refusal_in
    from trainer.tools.export import export
    disk = small_disk(1 << 20)  # the model's safetensors need about 3.3 MB
    with pytest.raises(OSError) as refused:
        export(finished_run, disk / "x")
    assert refusal_in(refused.value).strerror == "No space left on device"
    assert str(refused.value.filename).startswith(str(disk / ".tmp-export-x"))
    assert list(disk.iterdir()) == []  # the temporary export and the lock are gone


# ---------------------------------------------------------------- too many open files

def test_prepare_with_too_few_open_files(tmp_path):
    def few_files():  # in the child
        resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))
    proc = subprocess.run([str(a) for a in python(*prepare_args(tmp_path / "data", "--num_proc=2",
                                                                "--chunk_bytes=65536"))],
                          cwd=REPO, capture_output=True, text=True, preexec_fn=few_files, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: Too many open files; this process may open no "
                                                           "more files: raise the limit (ulimit -n 65536)")
    assert not (tmp_path / "data").exists()
