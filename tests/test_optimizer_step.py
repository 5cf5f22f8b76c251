"""The optimizer step of a real DeepSpeed engine on the CPU (tests/optimizer_step.py) against the fake-tensor
simulation and the memory model: ZeRO-0 in bf16 with bf16 accumulation (FP16_UnfusedOptimizer's fp32 gradient
copies + AdamW's temporaries) and fp32, full and LoRA; and bitsandbytes' CPU kernels, whose temporaries only
the process's peak memory shows (bench/optimizer_temps.py)."""
import json
import re

import pytest

from tests.conftest import REPO, python, run_cmd
from trainer.plan.memory import BNB_CPU_TEMPS_BYTES


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("optstep") / "records.json"
    run_cmd(python("tests/optimizer_step.py", out), cwd=REPO)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_simulated_step_is_the_real_engines(records):
    for r in records:
        if r["optimizer_name"] != "adamw":
            assert r["optimizer"] == "AdamW8bit"  # a client optimizer, stepped by DeepSpeed as it is in fp32
            continue
        assert r["optimizer"] == ("FP16_UnfusedOptimizer" if r["dtype"] == "bf16" else "AdamW")
        assert r["simulated"] == r["real"], r  # byte for byte


@pytest.mark.slow
def test_memory_model_counts_the_step(records):
    for r in [r for r in records if r["optimizer_name"] == "adamw"]:
        if r["dtype"] == "bf16":
            assert abs(r["estimated"] - r["real"]) <= 0.05 * r["real"], r
        else:  # fp32: the estimate is the larger of Adam's temporaries and ZeRO-0's all-reduce bucket (in backward)
            assert r["estimated"] >= r["real"], r


@pytest.mark.parametrize("optimizer,key", [("adamw8bit", "adamw8bit"), ("bnb_adamw", "adamw")])
def test_bitsandbytes_cpu_step_temporaries_are_the_memory_models(optimizer, key):
    out = run_cmd(python("bench/optimizer_temps.py", "--elements=20000000", f"--optimizer={optimizer}"), cwd=REPO)
    measured = float(re.search(r"bytes/element: ([\d.]+)", out.stdout).group(1))
    assert abs(measured - BNB_CPU_TEMPS_BYTES[key]) <= 1.0, measured
