"""GGUF export end to end: `merge_adapter.py --format=gguf` on tiny GPT-2 BPE runs, checked with real llama.cpp.

The runs: a full finetune and a LoRA run (merged into its base) of a random tiny GPT-2 with GPT-2's 50,257
tokens, trained a few steps on tiny Shakespeare's BPE tokens; a nanoGPT checkpoint with bias=False, whose
missing biases the file must carry as zeros; a character-level nanoGPT checkpoint, which is refused. Each file is
read back by the `gguf` package (names, hyperparameters, tokenizer) and loaded by llama.cpp (llama-cpp-python)
here, independently of the export's own check, against the model sample.py loads from the run.
"""
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, fails_cleanly, python, run_cmd
from test_nanogpt import write_nanogpt_checkpoint

sys.path.insert(0, str(REPO))
from trainer.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # launches training runs

MERGE = REPO / "launch/merge_adapter.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def train(data_dir, init_from, out, *extra):
    args = ["--dataset=shakespeare", f"--data_dir={data_dir}", f"--init_from={init_from}", "--block_size=64",
            "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=6", "--eval_interval=6",
            "--eval_iters=2", "--log_interval=1", "--tensorboard=False", "--warmup_iters=0", "--decay_lr=False",
            "--learning_rate=1e-3", f"--out_dir={out}", *extra]
    return run_cmd(python(REPO / "launch/train.py", *args), cwd=REPO, env=ONE_THREAD)


def export(out_dir, export_dir, *flags, check=True):
    return run_cmd(python(MERGE, f"--out_dir={out_dir}", f"--export_dir={export_dir}", "--format=gguf", *flags),
                   cwd=REPO, env=ONE_THREAD, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-runs")


@pytest.fixture(scope="module")
def full_run(data_dir, tiny_gpt2_dir, runs):
    train(data_dir, tiny_gpt2_dir, runs / "out-full", "--mode=full")
    return runs / "out-full"


@pytest.fixture(scope="module")
def lora_run(data_dir, tiny_gpt2_dir, runs):
    train(data_dir, tiny_gpt2_dir, runs / "out-lora", "--mode=lora", "--learning_rate=1e-2")
    return runs / "out-lora"


def llama_logits(path, idx):
    """llama.cpp's logits of each row of ids, read here with llama-cpp-python's own calls."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=idx.size(1), n_batch=idx.size(1), logits_all=True,
                          verbose=False)
    rows = []
    for row in idx.tolist():
        llm.reset()
        llm.eval(row)
        rows.append(np.array(llm.scores[:len(row)]))
    llm.close()
    return torch.from_numpy(np.stack(rows))


def trained_logits(out_dir, idx):
    from trainer.tools.loading import load_for_inference  # what sample.py and eval.py load
    with torch.no_grad():
        return load_for_inference(out_dir).lm(input_ids=idx).logits.float()


def fields(path):
    """{key: value} of the GGUF file's metadata, and its tensors by name."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_full_run_as_gguf_computes_the_trained_model(full_run, runs):
    proc = export(full_run, runs / "full-f32", "--gguf_type=f32")
    assert "tokens of a fixed text of" in proc.stdout and "are tiktoken's: ok" in proc.stdout, proc.stdout
    assert "max |logits(llama.cpp(model.gguf)) - logits(the trained model)|" in proc.stdout
    assert sorted(p.name for p in (runs / "full-f32").iterdir()) == ["Modelfile", "model.gguf"]
    path = runs / "full-f32" / "model.gguf"
    values, tensors = fields(path)
    assert values["general.architecture"] == "gpt2" and values["gpt2.block_count"] == 2
    assert values["gpt2.context_length"] == 64 and values["gpt2.embedding_length"] == 32
    assert values["gpt2.feed_forward_length"] == 128 and values["gpt2.attention.head_count"] == 2
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.eos_token_id"] == 50256
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [32, 96]  # ggml order: (in, out)
    # llama.cpp, loaded here, against the run as sample.py loads it, on ids the export's check never saw
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(7))
    ours, theirs = llama_logits(path, idx), trained_logits(full_run, idx)
    assert (ours - theirs).abs().max() <= 5e-3 * max(1.0, float(theirs.abs().max()))
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95
    # what `ollama create` reads
    modelfile = (runs / "full-f32" / "Modelfile").read_text()
    assert modelfile.splitlines()[:3] == ["FROM ./model.gguf", "PARAMETER num_ctx 64",
                                         'PARAMETER stop "<|endoftext|>"']


def test_q8_0_is_checked_by_agreement_and_perplexity(full_run, runs):
    proc = export(full_run, runs / "full-q8", "--gguf_type=q8_0")
    assert "next-token agreement on the fixed batch" in proc.stdout and "perplexity on 4x64 tokens" in proc.stdout
    assert proc.stdout.count(": ok") >= 4, proc.stdout  # tokenizer, logits line, agreement, perplexity
    _, tensors = fields(runs / "full-q8" / "model.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_up.bias"].tensor_type.name == "F32"
    # 34 bytes per block of 32 weights (32 int8 and an fp16 scale), against 128 in f32
    assert tensors["token_embd.weight"].n_bytes == 50257 * 32 // 32 * 34
    print(proc.stdout)


def test_merged_lora_run_as_gguf(lora_run, runs):
    proc = export(lora_run, runs / "lora-f16")  # f16 by default
    assert re.search(r"merged the adapters of \d+ layers into the base weights", proc.stdout), proc.stdout
    assert "(f16:" in proc.stdout and ": FAILED" not in proc.stdout
    _, tensors = fields(runs / "lora-f16" / "model.gguf")
    assert tensors["blk.1.attn_qkv.weight"].tensor_type.name == "F16"
    idx = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(3))
    ours, theirs = llama_logits(runs / "lora-f16" / "model.gguf", idx), trained_logits(lora_run, idx)
    assert (ours - theirs).abs().max() <= 1e-2 * max(1.0, float(theirs.abs().max()))


def test_nanogpt_checkpoint_without_biases_gets_zero_biases(tmp_path):
    ckpt_dir = write_nanogpt_checkpoint(tmp_path / "out-nano", dataset="openwebtext", vocab_size=50304, bias=False)
    proc = export(ckpt_dir, tmp_path / "exp", "--gguf_type=f32")
    assert "logits(the nanoGPT model)" in proc.stdout and ": FAILED" not in proc.stdout, proc.stdout
    values, tensors = fields(tmp_path / "exp" / "model.gguf")
    assert len(values["tokenizer.ggml.tokens"]) == 50304  # padded rows kept, as unused tokens
    assert values["tokenizer.ggml.tokens"][50300] == "[PAD50300]" and values["tokenizer.ggml.token_type"][50300] == 5
    print(proc.stdout)
    for name in ("blk.0.attn_qkv.bias", "blk.1.ffn_down.bias", "output_norm.bias", "blk.0.attn_norm.bias"):
        assert not np.asarray(tensors[name].data).any(), name


def test_what_gguf_cannot_carry_is_one_line(tmp_path, data_dir, full_run):
    char = write_nanogpt_checkpoint(tmp_path / "out-char")
    shutil.copy(data_dir / "shakespeare_char" / "meta.pkl", char / "meta.pkl")
    fails_cleanly([MERGE, f"--out_dir={char}", f"--export_dir={tmp_path / 'c'}", "--format=gguf"],
                  "is a character-level model (its 65 characters are in meta.pkl), and a GGUF file carries only",
                  watch=tmp_path)
    fails_cleanly([MERGE, f"--out_dir={full_run}", f"--export_dir={tmp_path / 'c'}", "--format=gguf",
                   "--gguf_type=q4_0"], "argument --gguf_type: invalid choice", watch=tmp_path)
    fails_cleanly([MERGE, f"--out_dir={full_run}", f"--export_dir={tmp_path / 'c'}", "--gguf_type=f16"],
                  "--gguf_type=f16 is the type of a GGUF file; add --format=gguf", watch=tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    fails_cleanly([MERGE, f"--out_dir={full_run}", f"--export_dir={tmp_path / 'busy'}", "--format=gguf"],
                  "already exists and is not empty", watch=tmp_path)
    # a failed check: nothing where a user would load it, no temporary folder left
    fails_cleanly([MERGE, f"--out_dir={full_run}", f"--export_dir={tmp_path / 'strict'}", "--format=gguf",
                   "--gguf_type=f32", "--tolerance=1e-9"], "error: parity check failed", watch=tmp_path)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".tmp-export-*"))
    from trainer.tools.export import export as export_run
    for kwargs, message in (({"gguf_type": "q4"}, "--gguf_type=q4: choose f32, f16 or q8_0"),
                            ({"gguf_type": "f16", "adapter_only": True}, "leave --adapter_only out"),
                            ({"gguf_type": "f16", "dtype": "bf16"}, "a GGUF file's type is --gguf_type")):
        with pytest.raises(UserError, match=message):
            export_run(full_run, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_an_instruction_run_gets_its_prompt_template_in_the_modelfile(tmp_path):
    """Ollama fills {{ .Prompt }} with the user's message: with no system message, the prompt it builds is the
    one training rendered (trainer/prepare/templates.py), character for character."""
    from trainer.prepare.templates import TEMPLATES
    from trainer.tools.gguf_export import write_modelfile
    for name, template in TEMPLATES.items():
        write_modelfile(tmp_path, 1024, name)
        text = (tmp_path / "Modelfile").read_text()
        ollama = re.search(r'TEMPLATE """(.*)"""', text, re.S)[1]
        # the {{ if .System }} branch not taken, then the message in place of {{ .Prompt }}
        no_system = re.sub(r"\{\{ if \.System \}\}.*?\{\{ else \}\}(.*?)\{\{ end \}\}", r"\1", ollama, flags=re.S)
        filled = no_system.replace("{{ .Prompt }}", "Name three colours.").replace("{{ .Response }}", "")
        assert filled == template.prompt("Name three colours."), name
        assert "PARAMETER num_ctx 1024" in text
