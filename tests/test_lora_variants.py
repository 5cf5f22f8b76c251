"""LoRA variants end to end (real peft and DeepSpeed, the documented commands): DoRA, rsLoRA, PiSSA and OLoRA
starts, LoRA+, and NEFTune on the way (three runs); each exported merged (checked against the trained model and against
the variant's own formula) and as a peft adapter directory loaded on the original base.

The base is test_lora's random tiny character GPT-2 saved in Hugging Face format (a stand-in for downloaded
weights); runs are a few iterations at a high learning rate, so the adapters move far from their start.
"""
import json
import re
import sys

import pytest
import torch

from conftest import REPO, python, run_cmd
from test_lora import VOCAB, common, logits, make_char_gpt2, parity

sys.path.insert(0, str(REPO))
from trainer.config import DEFAULTS, Config  # noqa: E402
from trainer.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # launches training runs

TRAIN = REPO / "launch/train.py"
MERGE = REPO / "launch/merge_adapter.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCALE = 16 / 8  # lora_alpha / lora_r


def run(args, check=True):
    return run_cmd(args, cwd=REPO, check=check, env=ONE_THREAD)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("variants") / "tiny-gpt2"
    make_char_gpt2(path)
    return path


def train(data_dir, base, out, *variant, iters=6):
    args = [*common(data_dir), f"--init_from={base}", "--mode=lora", "--learning_rate=1e-2", f"--max_iters={iters}",
            f"--eval_interval={iters}", "--eval_iters=2", "--sample_max_new_tokens=0", f"--out_dir={out}", *variant]
    return run(python(TRAIN, *args)).stdout


def export(out, export_dir, *flags, check=True):
    return run(python(MERGE, f"--out_dir={out}", f"--export_dir={export_dir}", *flags), check=check)


@pytest.fixture(scope="module")
def dora_run(data_dir, base):
    """DoRA with rsLoRA's scaling and LoRA+ (ratio 16), NEFTune noise on the embeddings while it trains; ZeRO-1
    (DeepSpeed's flat optimizer groups). One iteration, in the schedule's warmup (lr/2 at iteration 0)."""
    out = base.parent / "out-dora"
    return out, train(data_dir, base, out, "--use_dora=True", "--use_rslora=True", "--neftune_alpha=5",
                      "--loraplus_lr_ratio=16", "--zero_stage=1", "--decay_lr=True", "--warmup_iters=1",
                      "--learning_rate=2e-3", "--weight_decay=0.0", "--lora_dropout=0.0", iters=1)


@pytest.fixture(scope="module")
def pissa_run(data_dir, base):
    """PiSSA's start, with DoRA on top."""
    out = base.parent / "out-pissa"
    return out, train(data_dir, base, out, "--lora_init=pissa", "--use_dora=True")


@pytest.fixture(scope="module")
def olora_run(data_dir, base):
    out = base.parent / "out-olora"
    return out, train(data_dir, base, out, "--lora_init=olora")


def adapted_weights(model):
    """{name: (out, in) weight} of every projection LoRA adapts (GPT-2's Conv1D keeps (in, out))."""
    return {name: module.weight.detach().t() for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc")}


def trained_adapters(out):
    """{projection name: (A, B, DoRA magnitude or None)} from the run's latest checkpoint."""
    from trainer.run.weights import adapter_state_dict
    state = adapter_state_dict(out)
    found = {}
    for key, value in state.items():
        m = re.match(r"base_model\.model\.(.*)\.(lora_A|lora_B|lora_magnitude_vector)\.default(\.weight)?$", key)
        found.setdefault(m[1], {})[m[2]] = value
    return {name: (t["lora_A"], t["lora_B"], t.get("lora_magnitude_vector")) for name, t in found.items()}


def test_dora_rslora_run_counts_and_exports(dora_run, base):
    out, stdout = dora_run
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["use_dora"], cfg["use_rslora"], cfg["neftune_alpha"]) == (True, True, 5.0)
    # DoRA adds a magnitude per output of each adapted projection: what the plan counts is what trains
    trainable = int(re.search(r"parameters: [\d,]+ total, ([\d,]+) trainable", stdout)[1].replace(",", ""))
    magnitudes = 2 * (192 + 64 + 64 + 256)
    assert trainable == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)) + magnitudes
    assert json.loads((out / "plan.json").read_text())["params_trainable"] == trainable

    merged_log = export(out, base.parent / "dora-merged").stdout
    adapter_log = export(out, base.parent / "dora-adapter", "--adapter_only").stdout
    assert "DoRA, rsLoRA, LoRA+ ratio 16" in merged_log
    assert parity(merged_log) <= 1e-4 and parity(adapter_log) <= 1e-4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(base.parent / "dora-merged").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), base.parent / "dora-adapter")
    saved = json.loads((base.parent / "dora-adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"]
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (logits(merged, idx) - logits(adapter.eval(), idx)).abs().max() <= 1e-5
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (logits(merged, idx) - logits(plain, idx)).abs().max() > 1e-3  # the adapters did something


def test_loraplus_b_matrices_learn_at_the_ratio_through_the_schedule(dora_run):
    """AdamW's first step moves an element by lr * g / (|g| + eps), the learning rate wherever the gradient is
    not tiny, and LoRA's B starts at zero: after the first iteration B's largest elements are ratio x the
    schedule's learning rate. The warmup gives lr/2 = 1e-3 at iteration 0, so B moved 16e-3: a ratio the
    schedule dropped (1e-3), or a schedule never applied to B's group (2e-3 or 32e-3), would show."""
    _, stdout = dora_run
    assert "iter 1/1: loss" in stdout and "lr 1.00e-03" in stdout
    for name, (_, b, _) in trained_adapters(dora_run[0]).items():
        moved = b.detach().abs()
        assert abs(float(moved.max()) - 16e-3) <= 16e-6 and abs(float(moved.median()) - 16e-3) <= 16e-5, name


def test_pissa_dora_merged_export_is_the_trained_model_by_its_formula(pissa_run, base):
    """The merged export equals PiSSA's model written from first principles: the base keeps W - W_r (W_r: the
    best rank-r approximation, from torch's SVD here), the adapters add scale * B A, and DoRA rescales each
    output row to the trained magnitude."""
    out, _ = pissa_run
    log = export(out, base.parent / "pissa-merged").stdout
    assert "init pissa" in log and parity(log) <= 1e-4
    from transformers import AutoModelForCausalLM
    original = adapted_weights(AutoModelForCausalLM.from_pretrained(base))
    merged = adapted_weights(AutoModelForCausalLM.from_pretrained(base.parent / "pissa-merged"))
    for name, (a, b, magnitude) in trained_adapters(out).items():
        u, s, vh = torch.linalg.svd(original[name], full_matrices=False)
        residual = original[name] - (u[:, :8] * s[:8]) @ vh[:8]
        direction = residual + SCALE * b @ a
        expected = (magnitude / direction.norm(dim=1))[:, None] * direction
        assert (merged[name] - expected).abs().max() <= 1e-5, name
        assert (b @ a).abs().max() > 1e-2  # trained adapters, not the start
    # an adapter directory cannot carry DoRA on a PiSSA start (peft's conversion drops the magnitudes)
    proc = export(out, base.parent / "pissa-adapter", "--adapter_only", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {out} trained DoRA adapters started by lora_init=pissa, which peft cannot convert for the original "
        f"base (the conversion drops DoRA's magnitudes); export the merged model without --adapter_only")
    assert not (base.parent / "pissa-adapter").exists()


def test_olora_exports_merged_and_converted_for_the_original_base(olora_run, base):
    """OLoRA's start on GPT-2's Conv1D layers (QR of each (out, in) weight: B = Q[:, :r], A = R[:r]); the merged
    export equals W - scale * Q_r R_r + scale * B A, and the adapter directory, converted by peft to rank 2r, gives
    the same model on the ORIGINAL base."""
    out, _ = olora_run
    merged_log = export(out, base.parent / "olora-merged").stdout
    adapter_log = export(out, base.parent / "olora-adapter", "--adapter_only").stdout
    assert parity(merged_log) <= 1e-4 and parity(adapter_log) <= 1e-4
    assert "olora adapters converted for the original base by peft: rank 16" in adapter_log
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    original = adapted_weights(AutoModelForCausalLM.from_pretrained(base))
    merged_model = AutoModelForCausalLM.from_pretrained(base.parent / "olora-merged").eval()
    merged = adapted_weights(merged_model)
    for name, (a, b, _) in trained_adapters(out).items():
        q, r = torch.linalg.qr(original[name])
        expected = original[name] - SCALE * q[:, :8] @ r[:8] + SCALE * b @ a
        assert (merged[name] - expected).abs().max() <= 1e-5, name
    saved = json.loads((base.parent / "olora-adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (16, 32, True)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), base.parent / "olora-adapter")
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (logits(adapter.eval(), idx) - logits(merged_model, idx)).abs().max() <= 1e-5
    # what sample.py and eval.py load from the run folder is the same model
    from trainer.tools.loading import load_for_inference
    assert (logits(load_for_inference(str(out)).lm, idx) - logits(merged_model, idx)).abs().max() <= 1e-5


def test_param_groups_and_set_lr_keep_the_loraplus_ratio(base):
    """The groups DeepSpeed gets: decayed matrices, LoRA+'s B matrices (their lr = the schedule's x ratio),
    then the undecayed (DoRA's magnitudes); set_lr writes the schedule's lr with each group's ratio."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from trainer.model.adapters import lora_config, wrap_lora
    from trainer.optim.optimizer import param_groups
    from trainer.run.engine import set_lr
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(base), lora_config(Config(use_dora=True)))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.1, 16.0)
    assert [len(g["params"]) for g in groups] == [8, 8, 8]
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.1
    assert all("magnitude" in names[id(p)] for p in groups[2]["params"]) and groups[2]["weight_decay"] == 0.0
    assert len(param_groups(model, 0.1)) == 2  # ratio 1: the groups of before
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(SimpleNamespace(optimizer=optimizer), 3e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4, 3e-4 * 16, 3e-4]


def test_resume_keeps_the_variant(tmp_path):
    """A resume takes the adapters' variant from the run (its checkpoint holds those adapters); asking for
    another is one line. A run saved before these keys existed reads them as the defaults."""
    from trainer.run.resume import resume_config
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({**DEFAULTS, "mode": "lora", "use_dora": True,
                                                      "loraplus_lr_ratio": 4.0}))
    cfg = resume_config(Config(init_from="resume"), tmp_path)
    assert (cfg.use_dora, cfg.loraplus_lr_ratio) == (True, 4.0)
    with pytest.raises(UserError, match=re.escape("holds a model with lora_init='default', but this run asks for "
                                                  "lora_init='pissa'")):
        resume_config(Config(init_from="resume", lora_init="pissa"), tmp_path)
    old = {k: v for k, v in DEFAULTS.items() if k not in ("use_dora", "use_rslora", "lora_init", "loraplus_lr_ratio")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert resume_config(Config(init_from="resume"), tmp_path).lora_init == "default"


def test_export_refuses_a_qlora_base_choice_for_a_lora_run(olora_run, tmp_path):
    from trainer.tools.export import export as export_run
    out, _ = olora_run
    with pytest.raises(UserError, match=re.escape(f"--qlora_base=dequantized merges into a QLoRA run's 4-bit base, "
                                                  f"but {out} trained in lora mode; leave --qlora_base out")):
        export_run(out, tmp_path / "x", qlora_base="dequantized")
    assert not (tmp_path / "x").exists()
