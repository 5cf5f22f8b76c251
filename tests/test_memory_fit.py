"""bench/memory_fit.py's code paths on the CPU (--dry_run); its GPU table is measured on a GPU."""
import json

from conftest import REPO, python, run_cmd
import pytest

pytestmark = pytest.mark.slow  # launches training runs

SCRIPT = REPO / "bench/memory_fit.py"


def test_dry_run_plans_runs_and_writes_the_report(tmp_path):
    out, results = tmp_path / "MEMORY.md", tmp_path / "rows.json"
    run_cmd(python(SCRIPT, "--dry_run", f"--out={out}", f"--results={results}", "--steps=1"), cwd=REPO)
    rows = {r["cap_gb"]: r for r in json.loads(results.read_text())}
    assert rows[1]["status"] == "does not fit" and "nothing fits" in rows[1]["error"]  # the CPU process alone is 1 GiB
    ran = rows[2]
    assert ran["status"] == "ok" and ran["tokens_per_sec"] > 0 and ran["predicted_allocated"] > 0
    assert ran["plan"]["micro_batch_size"] * ran["plan"]["grad_accum_per_rank"] == 8
    text = out.read_text()
    assert text.startswith("# Memory fit (DRY RUN on the CPU") and "| tiny | 2 GB | full, 0, none, off, 8 x 1 |" in text
    assert "- out of memory: none" in text


def test_without_a_gpu_it_says_so(tmp_path):
    proc = run_cmd(python(SCRIPT, f"--results={tmp_path / 'rows.json'}", f"--out={tmp_path / 'M.md'}"), cwd=REPO,
                   check=False)
    import torch
    if not torch.cuda.is_available():
        assert proc.returncode != 0 and "no GPU" in proc.stderr
        assert not (tmp_path / "M.md").exists()
