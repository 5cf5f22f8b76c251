"""LoRA, QLoRA and export end to end: real peft, bitsandbytes and DeepSpeed, the documented commands.

The chain a user follows: a tiny GPT-2 in Hugging Face format (made here, character vocabulary so that
the runs take seconds) stands in for downloaded weights; a full finetune (ZeRO-1, so its optimizer
states are ZeRO shards) is exported with merge_adapter.py and becomes the pretrained base of the LoRA
and QLoRA runs, whose adapters are exported merged and as peft adapter directories; LoRA also runs on
two CPU ranks with ZeRO-2 and ZeRO-3 and gradient checkpointing.

Figures printed by test_adapter_checkpoint_is_small on the development machine: the LoRA checkpoint
(r=8: 28,672 adapter weights and their Adam states, on a base of 108,352 weights) is 248,783 bytes, 14.0%
of the full run's 1,771,687 bytes (QLoRA, saved through ZeRO-1: 304,750, 17.2%). The share is large only
because this base is tiny; for GPT-2 124M bench/modes_memory.py measured 14 MiB against 1.38 GiB (1.0%,
bench/RESULTS.md).
"""
import json
import re
import sys

import pytest
import torch

from conftest import REPO, deepspeed_cmd, python, run_cmd
from test_train_e2e import val_losses

sys.path.insert(0, str(REPO))  # `pytest` without -m does not put the repo on sys.path
from trainer.errors import UserError  # noqa: E402
from trainer.model.shapes import gpt2_param_count  # noqa: E402

pytestmark = pytest.mark.slow  # launches training runs

TRAIN = REPO / "launch/train.py"
MERGE = REPO / "launch/merge_adapter.py"
VOCAB = 65  # shakespeare_char
# One thread per process: these models are too small for a second thread to help, and the tests'
# processes (two ranks at a time) would otherwise oversubscribe a small CI machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAINABLE = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # r=8 on the 4 projections, 2 layers


def make_char_gpt2(path):
    """A random 2-layer GPT-2 with tiny Shakespeare's 65 characters, saved in Hugging Face format."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=VOCAB,
                        bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(path)


def common(data_dir):
    return ["--dataset=shakespeare_char", f"--data_dir={data_dir}", "--block_size=64", "--batch_size=4",
            "--gradient_accumulation_steps=2", "--eval_iters=4", "--log_interval=1", "--tensorboard=False",
            "--warmup_iters=0", "--decay_lr=False", "--always_save_checkpoint=True"]


def train_losses(stdout):
    """{iteration: printed train loss} from the per-iteration console lines."""
    return {int(m[0]): m[1] for m in re.findall(r"^iter (\d+)/\d+: loss ([\d.]+)", stdout, re.M)}


def checkpoint_bytes(out_dir):
    tag = (out_dir / "checkpoints" / "latest").read_text().strip()
    return sum(p.stat().st_size for p in (out_dir / "checkpoints" / tag).rglob("*") if p.is_file())


def parity(stdout):
    """The checked parity number merge_adapter.py prints."""
    return float(re.search(r"parity on a fixed batch .*?= ([\d.e+-]+) \(tolerance", stdout)[1])


def run(args, check=True):
    return run_cmd(args, cwd=REPO, check=check, env=ONE_THREAD)


def export(out_dir, export_dir, *flags, check=True):
    return run(python(MERGE, f"--out_dir={out_dir}", f"--export_dir={export_dir}", *flags), check=check)


def logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits.float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-runs")


@pytest.fixture(scope="module")
def full_run(data_dir, runs):
    """Full finetune of the random tiny GPT-2, ZeRO-1: its optimizer states are ZeRO shards."""
    base = runs / "tiny-gpt2"
    make_char_gpt2(base)
    out = runs / "out-full"
    proc = run(python(TRAIN, *common(data_dir), f"--init_from={base}", "--mode=full", "--zero_stage=1",
                      "--learning_rate=1e-2", "--max_iters=20", "--eval_interval=20", f"--out_dir={out}"))
    return out, proc.stdout


@pytest.fixture(scope="module")
def pretrained(full_run, runs):
    """The full run exported (ZeRO shards consolidated by zero_to_fp32): the base of the adapter runs."""
    proc = export(full_run[0], runs / "pretrained")
    return runs / "pretrained", proc.stdout


def lora_args(data_dir, pretrained, out, mode="lora", max_iters=20):
    return [*common(data_dir), f"--init_from={pretrained[0]}", f"--mode={mode}", "--learning_rate=1e-2",
            f"--max_iters={max_iters}", "--eval_interval=10", f"--out_dir={out}"]


@pytest.fixture(scope="module")
def lora_run(data_dir, pretrained, runs):
    out = runs / "out-lora"
    return out, run(python(TRAIN, *lora_args(data_dir, pretrained, out))).stdout


@pytest.fixture(scope="module")
def qlora_run(data_dir, pretrained, runs):
    out = runs / "out-qlora"
    # ZeRO-1 on one rank: the 4-bit base under a ZeRO optimizer, adapters consolidated by zero_to_fp32
    return out, run(python(TRAIN, *lora_args(data_dir, pretrained, out, mode="qlora"), "--zero_stage=1")).stdout


@pytest.fixture(scope="module")
def lora_exports(lora_run, runs):
    merged = export(lora_run[0], runs / "lora-merged")
    adapter = export(lora_run[0], runs / "lora-adapter", "--adapter_only")
    return runs / "lora-merged", merged.stdout, runs / "lora-adapter", adapter.stdout


def test_full_run_trains_and_exports_from_zero_shards(full_run, pretrained):
    out, stdout = full_run
    losses = val_losses(stdout)
    assert losses[20] < losses[0] - 0.5, losses
    assert list((out / "checkpoints").glob("iter*/zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    folder, log = pretrained
    assert parity(log) <= 1e-4
    assert {"model.safetensors", "config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.n_positions == 64 and model.config.vocab_size == VOCAB  # block_size cropped the table
    from trainer.tools.loading import load_for_inference  # what sample.py and eval.py do with an export
    loaded = load_for_inference(str(folder))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("To be")) == "To be" and loaded.vocab_limit == VOCAB


@pytest.mark.parametrize("which", ["lora", "qlora"])
def test_adapter_runs_lower_held_out_loss_and_print_counts(which, lora_run, qlora_run):
    out, stdout = {"lora": lora_run, "qlora": qlora_run}[which]
    losses = val_losses(stdout)
    assert losses[20] < losses[0] - 0.05, losses
    m = re.search(r"parameters: ([\d,]+) total, ([\d,]+) trainable \(([\d.]+)%\)", stdout)
    total, trainable = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
    assert trainable == TRAINABLE
    assert total == TRAINABLE + gpt2_param_count(2, 2, 64, VOCAB, 64)  # QLoRA's packed 4-bit weights count as weights
    assert json.loads((out / "plan.json").read_text())["mode"] == which


def test_adapter_checkpoint_is_small(full_run, lora_run, qlora_run, capsys):
    full = checkpoint_bytes(full_run[0])
    for out, _ in (lora_run, qlora_run):
        size = checkpoint_bytes(out)
        with capsys.disabled():
            print(f"\n{out.name}: checkpoint {size:,} bytes = {100 * size / full:.1f}% of the full run's "
                  f"{full:,} bytes")
        assert size < 0.2 * full
        saved = torch.load(next((out / "checkpoints").glob("iter*/mp_rank_00_model_states.pt")), weights_only=False)
        # adapters only: no tied lm_head (DeepSpeed's exclude_frozen_parameters keeps it), no 4-bit constants
        assert len(saved["module"]) == 16 and all(".lora_" in k for k in saved["module"])


def test_merged_lora_export_equals_peft_merge_and_unload(lora_exports, lora_run, pretrained):
    merged_dir, merged_log, adapter_dir, adapter_log = lora_exports
    assert parity(merged_log) <= 1e-4 and parity(adapter_log) <= 1e-4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained[0]), adapter_dir)
    reference = reference.merge_and_unload().eval()
    ref_state = reference.state_dict()
    for name, tensor in merged.state_dict().items():
        assert (tensor - ref_state[name]).abs().max() <= 1e-5, name
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (logits(merged, idx) - logits(reference, idx)).abs().max() <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(pretrained[0])
    assert (merged.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight).abs().max() > 1e-3
    # what sample.py and eval.py load from the run dir (no export) is the same model
    from trainer.tools.loading import load_for_inference
    assert (logits(load_for_inference(str(lora_run[0])).lm, idx) - logits(merged, idx)).abs().max() <= 1e-5


def test_qlora_export_merges_into_unquantized_base(qlora_run, runs):
    out, _ = qlora_run
    proc = export(out, runs / "qlora-merged", "--dtype=bf16")
    assert "into the unquantized original weights" in proc.stdout
    assert parity(proc.stdout) <= 5e-2
    gap = re.search(r"parity vs the 4-bit model as trained: max \|logits\| difference = ([\d.e+-]+)", proc.stdout)
    assert gap and float(gap[1]) > 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(runs / "qlora-merged")
    assert model.dtype == torch.bfloat16
    assert "quantization_config" not in (runs / "qlora-merged" / "config.json").read_text()


def test_qlora_export_as_trained_merges_into_the_dequantized_base(qlora_run, runs):
    """--qlora_base=dequantized: the adapters merged into bitsandbytes' dequantize_4bit of the nf4 weights the run
    trained on, checked against the 4-bit model with its adapters (the model as trained), which it equals in
    fp32 while the default export differs from it by the quantization gap."""
    out, _ = qlora_run
    proc = export(out, runs / "qlora-as-trained", "--qlora_base=dequantized")
    assert "into the dequantized 4-bit weights the run trained on (bitsandbytes' dequantize_4bit)" in proc.stdout
    assert "logits(the 4-bit model as trained)|" in proc.stdout and parity(proc.stdout) <= 1e-4
    gap = float(re.search(r"vs base \+ adapter unquantized \(--qlora_base=original\): max \|logits\| difference = "
                          r"([\d.e+-]+)", proc.stdout)[1])
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from trainer.run.weights import load_adapter_run
    as_trained = AutoModelForCausalLM.from_pretrained(runs / "qlora-as-trained").eval()
    original = load_adapter_run(out, quantized=False).merge_and_unload()  # what the default export merges
    four_bit = load_adapter_run(out)  # the 4-bit base with the trained adapters, as sample.py loads the run
    idx = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    reference = logits(four_bit, idx)
    assert (logits(as_trained, idx) - reference).abs().max() <= 1e-4
    assert (logits(original, idx) - reference).abs().max() > 100 * (logits(as_trained, idx) - reference).abs().max()
    assert gap > 1e-3
    # each adapted weight is dequantize_4bit's nf4 values plus scale * B A (Conv1D keeps it (in, out))
    lora = four_bit.base_model.model.transformer.h[0].mlp.c_fc
    assert isinstance(lora.base_layer, bnb.nn.Linear4bit)
    nf4 = bnb.functional.dequantize_4bit(lora.base_layer.weight.data, lora.base_layer.weight.quant_state)
    delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    assert (as_trained.transformer.h[0].mlp.c_fc.weight - (nf4 + delta).t()).abs().max() <= 1e-6
    assert delta.abs().max() > 1e-3
    with pytest.raises(UserError, match="--adapter_only writes the adapters without a base, so --qlora_base"):
        from trainer.tools.export import export as export_run
        export_run(out, runs / "no-such", adapter_only=True, qlora_base="dequantized")


def test_sample_runs_on_a_qlora_run_dir(qlora_run):
    proc = run(python(REPO / "launch/sample.py", f"--out_dir={qlora_run[0]}", "--start=To be", "--num_samples=1",
                          "--max_new_tokens=30"))
    sample = [line for line in proc.stdout.splitlines() if line.startswith("To be")]
    assert sample and len(sample[0]) > 10


def test_lora_resume_gives_the_same_losses(data_dir, pretrained, lora_run, runs):
    out = runs / "out-lora-resumed"
    first = run(python(TRAIN, *lora_args(data_dir, pretrained, out, max_iters=10)))
    second = run(python(TRAIN, *lora_args(data_dir, pretrained, out), "--init_from=resume"))
    assert "resumed from iteration 10" in second.stdout
    resumed = {**train_losses(first.stdout), **train_losses(second.stdout)}
    uninterrupted = train_losses(lora_run[1])
    assert sorted(resumed) == list(range(1, 21)) and resumed == uninterrupted
    assert val_losses(second.stdout)[20] == val_losses(lora_run[1])[20]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_two_ranks_with_checkpointing(zero_stage, data_dir, pretrained, runs):
    out = runs / f"out-lora-z{zero_stage}"
    proc = run(deepspeed_cmd(TRAIN, *lora_args(data_dir, pretrained, out, max_iters=10),
                             f"--zero_stage={zero_stage}", "--gradient_checkpointing=True", num_gpus=2))
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["zero_stage"], plan["gradient_checkpointing"], plan["n_devices"]) == (zero_stage, True, 2)
    losses = val_losses(proc.stdout)
    # it trains: with gelu_new the ZeRO-2 run dropped by more than 0.05 in 10 iterations; the fused tanh GELU
    # (a difference of at most 4.8e-7 per activation) takes another trajectory, measured at 0.046
    assert losses[10] < losses[0] - 0.03, losses
    if zero_stage == 2:
        return
    # ZeRO-3 leaves empty (shape [0]) tensors in the module file; exports must hold the real adapters
    saved = torch.load(next((out / "checkpoints").glob("iter*/zero_pp_rank_0_mp_rank_00_model_states.pt")),
                       weights_only=False)
    assert saved["module"] and all(v.numel() == 0 for v in saved["module"].values())
    assert parity(export(out, runs / "z3-merged").stdout) <= 1e-4
    from safetensors.torch import load_file

    from trainer.tools.export import export as export_run
    export_run(out, runs / "z3-adapter", adapter_only=True, log=lambda *_: None)
    adapters = load_file(runs / "z3-adapter" / "adapter_model.safetensors")
    assert len(adapters) == 16 and all(t.numel() > 0 for t in adapters.values())
    assert all(t.abs().max() > 0 for k, t in adapters.items() if "lora_B" in k)  # B starts at zero: it trained


def test_refusals_are_one_line(data_dir, full_run, pretrained, runs):
    """QLoRA with ZeRO-3 and a failed parity check through the commands; the other refusals in-process."""
    from trainer.model.adapters import check_source
    from trainer.tools.export import export as export_run
    cases = [
        (python(TRAIN, *common(data_dir), f"--init_from={pretrained[0]}", "--mode=qlora", "--zero_stage=3",
                f"--out_dir={runs / 'no-q3'}"), "error: QLoRA cannot run with ZeRO-3", runs / "no-q3"),
        (python(MERGE, f"--out_dir={full_run[0]}", f"--export_dir={runs / 'no-par'}", "--dtype=bf16",
                "--tolerance=1e-9"), "error: parity check failed", runs / "no-par"),
    ]
    for args, message, path in cases:
        proc = run(args, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
        assert not path.exists() and not list(runs.glob(f".tmp-export-{path.name}"))
    with pytest.raises(UserError, match="init_from='scratch' has none"):
        check_source("qlora", "scratch")
    from trainer.model.adapters import build_base
    from trainer.config import Config
    moved = Config.saved({**json.loads((full_run[0] / "config.json").read_text()), "init_from": str(runs / "moved")})
    with pytest.raises(UserError, match="the base weights of the adapter run out-x, .* are no longer there"):
        build_base(moved, VOCAB, "lora", run_dir="out-x")
    with pytest.raises(UserError, match="--adapter_only needs a lora or qlora run"):
        export_run(full_run[0], runs / "no-ad", adapter_only=True)
    with pytest.raises(UserError, match="already exists and is not empty"):
        export_run(full_run[0], pretrained[0])


def test_gpt2_bpe_exports_carry_the_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from trainer.tools.export import write_tokenizer
    from trainer.data.tokenizer import gpt2_encoding
    assert write_tokenizer({"tokenizer": "gpt2"}, tmp_path)
    text = "To be, or not to be: that is the question.\n\n  Whither   thou go'st 123"
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == gpt2_encoding().encode(text)
