"""bench/gpu_check.py's code paths on the CPU (--dry_run); its GPU table is measured on a GPU (docs/gpu.md)."""
import pytest

from conftest import REPO, python, run_cmd

SCRIPT = REPO / "bench/gpu_check.py"


@pytest.mark.slow  # every step in its own process (each imports torch and DeepSpeed); the oom step trains
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "GPU.md"
    proc = run_cmd(python(SCRIPT, "--dry_run", f"--out={out}", "--fit_steps=1", "--speed_steps=1",
                          "--time_scale=20", "--row_timeout=700"), cwd=REPO, timeout=3600, check=False)
    text = out.read_text()
    assert text.startswith("# GPU check (DRY RUN on the CPU"), text
    for step in ("context", "memory", "speed", "qlora", "packed", "offload", "oom", "toolbox", "loop"):
        assert f"## {step} (ok" in text, f"{step} did not finish:\n{text}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "| tiny | 2 GB | full, 0, none, off, 8 x 1 |" in text
    assert "| packed, dense_mask | forward (CPU) |" in text
    for tools in ("qlora, 0, none, off, 8 x 1, adamw8bit |", "full, 0, none, off, 8 x 1, accum bf16 |",
                  "full, 0, none, on, 8 x 1, act. offload |", "full, 0, none, off, 8 x 1, bf16_kahan weights |",
                  "full, 0, none, on, 8 x 1, bf16_sr weights |", "full, 0, none, off, 8 x 1, bf16_kahan weights, "
                  "in backward |", "full, 0, none, off, 8 x 1, adamw4bit, bf16_sr weights, in backward |",
                  "full, 0, none, off, 8 x 1, adam_mini, bf16 weights |"):  # each tool forced once
        assert f"| tiny | 2 GB | {tools}" in text, text
    assert "- CUDA allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    assert "| iterations done | 6 of 6 |" in text and "iteration 1: out of memory" in text  # injected, stepped down
    assert "| the loop's own cost |" in text and "| host syncs in one iteration (cuda*Synchronize calls) | 0 |" in text
    assert proc.returncode == 0 and "every step ok" in proc.stdout


def test_bad_step_and_no_gpu_are_one_error_line(tmp_path):
    proc = run_cmd(python(SCRIPT, "--dry_run", "--only=speed,warp", f"--out={tmp_path / 'G.md'}"), cwd=REPO,
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown step warp")
    import torch
    if not torch.cuda.is_available():
        proc = run_cmd(python(SCRIPT, f"--out={tmp_path / 'G.md'}"), cwd=REPO, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no GPU")
        assert not (tmp_path / "G.md").exists()
