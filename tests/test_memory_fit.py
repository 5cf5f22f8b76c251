"""bench/memory_fit.py's code paths on the CPU (--dry_run); on a GPU, one measured row (`gpu`); its GPU table
is measured on a GPU."""
import json

from conftest import REPO, has_cuda, python, run_cmd
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
    if has_cuda():  # the command would start the whole measurement
        pytest.skip("a GPU is present: the no-GPU refusal cannot be shown")
    proc = run_cmd(python(SCRIPT, f"--results={tmp_path / 'rows.json'}", f"--out={tmp_path / 'M.md'}"), cwd=REPO,
                   check=False)
    assert proc.returncode != 0 and "no GPU" in proc.stderr
    assert not (tmp_path / "M.md").exists()


@pytest.mark.gpu
def test_on_a_gpu_one_row_is_measured_within_its_cap(tmp_path):
    out, results = tmp_path / "MEMORY.md", tmp_path / "rows.json"
    run_cmd(python(SCRIPT, "--models=gpt2", "--caps=8", "--steps=1", f"--out={out}", f"--results={results}"),
            cwd=REPO, timeout=900)
    (row,) = json.loads(results.read_text())
    assert row["status"] == "ok" and row["tokens_per_sec"] > 0, row
    assert 0 < row["allocated"] <= row["reserved"] <= 8 * 2**30 and row["predicted_allocated"] > 0
    assert out.read_text().startswith("# Memory fit")
