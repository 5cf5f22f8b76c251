"""Shared test fixtures: real data on disk, a tiny GPT-2 in Hugging Face format, real launches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"  # shipped with the repo: the tests need nothing outside it


def run_cmd(args, cwd, timeout=600, check=True, env=None):
    """Run a documented command for real; return the CompletedProcess (output as text)."""
    full_env = dict(os.environ)
    full_env.pop("RANK", None)  # each launch makes its own process group
    full_env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def python(*args):
    return [sys.executable, *map(str, args)]


def start(args, env=None):
    """A documented command running in the background, stderr merged so no pipe fills up unread."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("RANK", None)
    return subprocess.Popen([str(a) for a in args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env)


def wait_for(proc, marker):
    """Read the background command's output until a line holds `marker`; returns what it printed so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"never printed {marker!r}: {''.join(seen)[-3000:]}")


def snapshot(folder):
    """Every file under folder with its size and modification time (to prove nothing changed)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def fails_cleanly(args, expected, watch=None, env=None, command=None):
    """Run the command (python args, or `command` as given); it must fail with exactly one `error:` line containing
    `expected`, exit code 2, no traceback, and leave `watch` as it was. Returns the error line."""
    before = snapshot(watch) if watch else None
    proc = run_cmd(command or python(*args), REPO, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    assert expected in errors[0], errors[0]
    if watch is not None:
        assert snapshot(watch) == before, "the failed command changed files"
    return errors[0]


def copy_run(run, tmp_path, name="run"):
    """A private copy of a finished run's folder, to damage, resume or continue."""
    import shutil
    out = tmp_path / name
    shutil.copytree(run, out)
    return out


def deepspeed_cmd(*args, num_gpus=None):
    """The `deepspeed` launcher of this interpreter's environment."""
    launcher = Path(sys.executable).with_name("deepspeed")
    extra = [f"--num_gpus={num_gpus}"] if num_gpus else []
    return [str(launcher), *extra, "--master_port", str(free_port()), *map(str, args)]


def free_port():
    """The trainer's own pick (trainer/launcher.py): outside the OS's ephemeral range, checked free."""
    from trainer.launcher import free_port as pick
    return pick()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """tiny Shakespeare prepared both ways (characters and GPT-2 BPE) in a temporary data_dir."""
    root = tmp_path_factory.mktemp("data")
    run_cmd(python(REPO / "data/shakespeare_char/prepare.py", f"--input={SHAKESPEARE}", f"--data_dir={root}"), REPO)
    run_cmd(python(REPO / "data/shakespeare/prepare.py", f"--input={SHAKESPEARE}", f"--data_dir={root}"), REPO)
    return root


def make_tiny_gpt2(path, n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257, seed=0):
    """A randomly initialised GPT-2 saved in Hugging Face format, standing in for real weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=vocab_size)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny_gpt2(path)
    return path


def tb_scalars(out_dir, tag):
    """{step: value} of one TensorBoard scalar; where a resumed run rewrote steps, the newest wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    events = sorted(acc.Scalars(tag), key=lambda e: e.wall_time)
    return {e.step: e.value for e in events}


def train_args(data_dir, out_dir, *extra, recipe="shakespeare_char_cpu"):
    """A training launch's arguments. The TensorBoard sample of every evaluation (200 generated tokens,
    most of a short run's training time) is off unless `extra` asks for it again (a later value wins);
    tests/test_train_e2e.py and tests/test_train_options.py check the sample."""
    return [REPO / "launch/train.py", "--recipe", recipe, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            "--sample_max_new_tokens=0", *extra]


# launch/test.sh gives each worker whole files (`--dist loadfile`) in the order collected. The longest files
# go first, so that the run does not end on one long file while the other worker idles (seconds per file
# in a 2-worker run on 2 cores, 2026-11-30; test_continue.py, test_launch_ports.py, test_lora_variants.py and
# issue 22's files, one to two minutes each alone on a loaded machine, 2026-12-02; the rest take under a minute
# each and keep their order).
LONGEST_FILES_FIRST = ("test_gpu_check.py", "test_resume.py", "test_lora.py", "test_lora_variants.py",
                       "test_multinode.py", "test_continue.py", "test_token_weighting.py", "test_faults.py",
                       "test_errors.py", "test_multirank.py", "test_signals.py", "test_lock.py",
                       "test_damaged_checkpoints.py", "test_os_errors.py", "test_launch_ports.py",
                       "test_engine_states.py", "test_lm_eval.py", "test_gguf.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: tests keep their order
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and not has_cuda():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (@pytest.mark.gpu)"))


def has_cuda():
    """Whether torch sees a CUDA GPU: `gpu` tests run only then, and a no-GPU check only without one."""
    import torch  # imported when asked, not at collection of every file
    return torch.cuda.is_available()
