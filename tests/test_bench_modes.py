"""bench/modes_memory.py's code paths on the CPU, with a tiny shape and one mode.

The GPU variant (`--device=cuda`: four sizes at block 1024, max_memory_allocated beside the plan's
allocated/total prediction) runs the same measure() and table(); only the table's columns differ,
checked here on the CPU row.
"""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import modes_memory  # noqa: E402
import pytest

pytestmark = pytest.mark.slow  # launches training runs


def test_modes_memory_cpu_run_and_gpu_table(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer it launches inherits it
    results = tmp_path / "RESULTS.md"
    # main() in this process (it launches the trainer as a subprocess, as the command does)
    (row,) = modes_memory.main(["--device=cpu", "--sizes=tiny", "--modes=qlora", "--block_size=64", "--batch_size=2",
                                "--iters=2", f"--data_dir={data_dir}", f"--work_dir={tmp_path / 'work'}",
                                f"--results={results}"])
    assert row["mode"] == "qlora" and "error" not in row, row
    assert 0 < row["training_rss"] and row["s_per_iter"] > 0 and row["cpu_s_per_iter"] > 0 and row["checkpoint"] > 0
    assert row["trainable"] == 2 * 8 * 16 * 64 and row["predicted_total"] > row["predicted_allocated"] > 0
    text = results.read_text()
    assert "| tiny | qlora | ZeRO-0, micro 2 |" in text and "peak RSS while training" in text and "CPU s/iter" in text
    assert not list((tmp_path / "work").glob("out-*/checkpoints"))  # removed after measuring

    sizes, block_size, _, _ = modes_memory.DEFAULTS["cuda"]
    assert sizes.split(",") == ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] and block_size == 1024
    gpu = modes_memory.table([row, {"size": "gpt2-xl", "mode": "full", "error": "error: nothing fits"}], "cuda",
                             "python bench/modes_memory.py --device=cuda", "NVIDIA H100", 1024, 4, 8)
    assert "| peak max_memory_allocated | plan: predicted allocated / total |" in gpu
    assert "| tiny | qlora |" in gpu and "| gpt2-xl | full | error: nothing fits |" in gpu
