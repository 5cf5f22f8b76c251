"""bench/vs_hf_trainer.py's dry run: both sides by their real commands (`deepspeed launch/train.py ...
--log_level=debug` and transformers' Trainer in the bench's worker), full and LoRA, the table appended to
a results file; and its --profile path (one iteration of each under torch.profiler)."""
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # launches training runs

BENCH = REPO / "bench/vs_hf_trainer.py"


def run_bench(*args):
    proc = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_dry_run_appends_the_comparison_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier tables\n")
    run_bench("--dry_run", "--modes=full", f"--results={results}")  # LoRA's side: the profile test below
    text = results.read_text()
    assert text.startswith("# earlier tables\n")  # appended, nothing lost
    assert "`python bench/vs_hf_trainer.py --dry_run --modes=full`" in text and "cores, torch" in text
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (full|lora) \| fp32 \| (.*) \|$", text, re.M)}
    assert set(rows) == {"full"}
    number = r"(-?[\d.]+) \((-?[\d.]+) to (-?[\d.]+)\)"  # median (min to max)
    for mode, row in rows.items():
        cells = [re.fullmatch(number, cell.strip()) for cell in row.split("|")]
        assert all(cells), (mode, row)
        median, low, high = ([float(c.group(i)) for c in cells] for i in (1, 2, 3))
        assert all(lo <= m <= hi for m, lo, hi in zip(median, low, high))
        assert median[:3] == low[:3] == high[:3]  # ms/iter and ratio: one per round, one round
        assert median[7:] == low[7:] == high[7:]  # CPU ms/iter and their ratio: one round
        assert len(cells) == 10  # ms/iter of both and their ratio, the start-ups, CPU ms/iter of both and theirs
        ours, launcher, ours_less, hf = median[3:7]
        assert ours > launcher > 0 and hf > 0  # the trainer's debug table was read, the launcher's share in it
        assert ours_less == pytest.approx(ours - launcher, abs=0.15)


def test_profile_dry_run_shows_each_sides_ops(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_bench("--profile", "--dry_run", "--modes=lora", "--rows=5", f"--results={results}")
    text = results.read_text()
    for side in ("trainer", "HF Trainer"):
        section = text[text.index(f"#### lora, {side}"):]
        assert re.search(r"one iteration: \d+ ms wall", section) and "aten::mm" in section, section[:2000]
    assert "torch.profiler" in out
