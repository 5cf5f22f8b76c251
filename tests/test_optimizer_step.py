"""The optimizer step of a real DeepSpeed engine on the CPU (tests/optimizer_step.py) against the fake-tensor
simulation and the memory model: ZeRO-0 in bf16 (FP16_UnfusedOptimizer's fp32 gradient copies + AdamW's
temporaries) and fp32, full and LoRA."""
import json

import pytest

from tests.conftest import REPO, python, run_cmd


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("optstep") / "records.json"
    run_cmd(python("tests/optimizer_step.py", out), cwd=REPO)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_simulated_step_is_the_real_engines(records):
    for r in records:
        assert r["optimizer"] == ("FP16_UnfusedOptimizer" if r["dtype"] == "bf16" else "AdamW")
        assert r["simulated"] == r["real"], r  # byte for byte


@pytest.mark.slow
def test_memory_model_counts_the_step(records):
    for r in records:
        if r["dtype"] == "bf16":
            assert abs(r["estimated"] - r["real"]) <= 0.05 * r["real"], r
        else:  # fp32: the estimate is the larger of Adam's temporaries and ZeRO-0's all-reduce bucket (in backward)
            assert r["estimated"] >= r["real"], r
