"""trainer/startup.py: the start-up clock's phases, a process's start time and the launcher's, from /proc.

The clock's table in a real `deepspeed` launch with --log_level=debug is read by bench/vs_hf_trainer.py's
dry run (tests/test_bench_vs_hf.py)."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from trainer.startup import StartupClock, format_phases, launcher_start, process_start

linux = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")


@linux
def test_process_start_is_when_the_process_began():
    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.5)
        started = process_start(child.pid)
    finally:
        child.kill()
        child.wait()
    assert before - 0.05 <= started <= before + 0.3, (before, started)  # to the kernel's tick, not the 0.5 s later
    assert process_start() < before


def test_clock_phases_add_up_and_stop_at_the_first_iteration():
    clock = StartupClock()
    time.sleep(0.05)
    clock.mark("first")
    time.sleep(0.1)
    clock.mark("second")
    phases = clock.finish()
    clock.mark("after the first iteration")  # a step-down's rebuild is not start-up
    assert "after the first iteration" not in phases and clock.done
    names = [name for name in phases if name != "total"]
    assert names[-2:] == ["first", "second"]
    assert 0.05 <= phases["first"] < phases["second"]
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
    if Path("/proc/self/stat").is_file():  # the interpreter ran before this clock was made
        assert phases["python start-up"] > 0
    table = format_phases(phases)
    assert table.startswith(f"start-up: {phases['total']:.1f} s from the command to the first iteration")
    assert len(table.splitlines()) == len(names) + 1


CHILD = textwrap.dedent(f"""
    import sys; sys.path.insert(0, {str(REPO)!r})
    from trainer.startup import launcher_start, process_start
    print(launcher_start(), process_start())
""")


@linux
def test_launcher_start_is_the_oldest_launcher_ancestor(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # a shell whose command line names torchrun stands for the launcher; it waits a moment, then starts us
    before = time.time()
    out = subprocess.run(["bash", "-c", f"sleep 0.5; {sys.executable} {script}; true", "torchrun"],
                         capture_output=True, text=True, check=True).stdout.split()
    launcher, own = float(out[0]), float(out[1])
    assert before - 0.05 <= launcher <= before + 0.3
    assert own - launcher >= 0.45  # the launcher's own time: what it did before starting this process
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.split()
    assert plain[0] == "None"  # no launcher: `python launch/train.py`
    assert launcher_start() is None or launcher_start() <= time.time()


@pytest.mark.skipif(any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")),
                    reason="a GPU driver is here: --plan asks torch about the GPU")
def test_plan_without_a_gpu_driver_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "launch/train.py"), "--recipe", "gpt2_xl",
                           "--plan"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "CPU (no GPU)" in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported and "deepspeed" not in imported
