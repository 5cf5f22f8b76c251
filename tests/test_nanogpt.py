"""nanoGPT's checkpoints in: read as transformers' GPT-2 with nanoGPT's architecture kept exactly, then
finetuned from, sampled, evaluated and exported by the documented commands.

The checkpoints are built here in nanoGPT's format (`out_dir/ckpt.pt`: model, model_args, iter_num,
best_val_loss, config, optimizer) with random weights, and the reference is a forward pass of nanoGPT's
architecture written below from its published shapes and equations (GPT-2's: pre-LayerNorm blocks,
causal multi-head attention, an MLP of 4x width with the exact GELU, weight-tied output), with its
nn.Linear layout (weights (out, in)) and without nanoGPT's code.
"""
import math
import pickle
import re

import pytest
import torch

from conftest import REPO, python, run_cmd, train_args

CHAR_VOCAB = 65  # tiny Shakespeare's characters (the data_dir fixture's shakespeare_char)
ATOL = 1e-5


def nanogpt_state(n_layer, n_head, n_embd, vocab_size, block_size, bias, seed=0, compiled=False, mask=False):
    """A state dict with nanoGPT's names and shapes; weights large enough that the activation matters."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=gen) * std + mean

    c = n_embd
    wte = rand(vocab_size, c, std=0.3)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": rand(block_size, c, std=0.3)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes = {"ln_1.weight": (c,), "attn.c_attn.weight": (3 * c, c), "attn.c_proj.weight": (c, c),
                  "ln_2.weight": (c,), "mlp.c_fc.weight": (4 * c, c), "mlp.c_proj.weight": (c, 4 * c)}
        for name, shape in shapes.items():
            sd[p + name] = rand(*shape, std=0.2, mean=1.0) if name.startswith("ln") else rand(*shape, std=0.3)
            if bias:
                sd[p + name.replace("weight", "bias")] = rand(shape[0], std=0.3)
        if mask:  # nanoGPT registers its causal mask as a buffer named attn.bias when flash attention is missing
            sd[p + "attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
    sd["transformer.ln_f.weight"] = rand(c, std=0.2, mean=1.0)
    if bias:
        sd["transformer.ln_f.bias"] = rand(c, std=0.3)
    sd["lm_head.weight"] = wte  # tied: one tensor under both names, as nn.Module.state_dict() gives it
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    return sd


def write_nanogpt_checkpoint(out_dir, dataset="shakespeare_char", n_layer=2, n_head=2, n_embd=32,
                             vocab_size=CHAR_VOCAB, block_size=64, bias=True, **kw):
    """out_dir/ckpt.pt as nanoGPT's train.py saves it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    optimizer.step()
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=vocab_size, dropout=0.0)
    config = dict(out_dir=str(out_dir), dataset=dataset, init_from="scratch", batch_size=12, block_size=block_size,
                  learning_rate=1e-3, dtype="float32", device="cpu", compile=False)
    torch.save({"model": nanogpt_state(n_layer, n_head, n_embd, vocab_size, block_size, bias, **kw),
                "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": config}, out_dir / "ckpt.pt")
    return out_dir


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + (0 if bias is None else bias)


def gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def nanogpt_forward(sd, idx, n_head, gelu=gelu_exact):
    """Logits of nanoGPT's GPT, from its state dict: the equations, one line each."""
    sd = {k.removeprefix("_orig_mod."): v.double() for k, v in sd.items()}
    linear = lambda x, name: x @ sd[name + ".weight"].T + sd.get(name + ".bias", 0)  # noqa: E731 (out, in)
    T = idx.size(1)
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.")})
    for i in layers:
        p = f"transformer.h.{i}."
        h = layer_norm(x, sd[p + "ln_1.weight"], sd.get(p + "ln_1.bias"))
        q, k, v = linear(h, p + "attn.c_attn").split(x.size(-1), dim=-1)
        heads = lambda t: t.view(t.size(0), T, n_head, -1).transpose(1, 2)  # noqa: E731 (B, nh, T, hs)
        q, k, v = heads(q), heads(k), heads(v)
        att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape)
        x = x + linear(y, p + "attn.c_proj")
        h = layer_norm(x, sd[p + "ln_2.weight"], sd.get(p + "ln_2.bias"))
        x = x + linear(gelu(linear(h, p + "mlp.c_fc")), p + "mlp.c_proj")
    x = layer_norm(x, sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias"))
    return x @ sd["lm_head.weight"].T


@pytest.mark.parametrize("bias, compiled, mask, vocab", [
    (True, False, False, CHAR_VOCAB),
    (False, True, False, 50304),     # compiled (`_orig_mod.` names), GPT-2 BPE padded to 50304
    (False, False, True, CHAR_VOCAB),  # the causal-mask buffers nanoGPT saves without flash attention
])
def test_read_as_gpt2_it_computes_nanogpts_logits(tmp_path, bias, compiled, mask, vocab):
    from trainer.model.gpt2 import load_pretrained
    out = write_nanogpt_checkpoint(tmp_path / "out", vocab_size=vocab, bias=bias, compiled=compiled, mask=mask)
    sd = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    idx = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    model = load_pretrained(str(out), dropout=0.0).eval()  # the out_dir; its ckpt.pt works the same
    assert model.config.activation_function == "gelu" and model.config.vocab_size == vocab
    with torch.no_grad():
        ours = model(input_ids=idx).logits.double()
    reference = nanogpt_forward(sd, idx, n_head=2)
    assert (ours - reference).abs().max() < ATOL
    # the activation matters at these weights: GPT-2's tanh GELU would be far outside the tolerance
    assert (nanogpt_forward(sd, idx, n_head=2, gelu=gelu_tanh) - reference).abs().max() > 100 * ATOL
    if not bias:  # no biases in nanoGPT: zero and frozen here
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        assert biases and all(not p.requires_grad and not p.any() for p in biases)


def test_only_gelu_new_is_replaced_any_other_activation_is_kept(tmp_path):
    """Loading, rebuilding from a saved config (resume, sampling, export) and building keep nanoGPT's exact GELU;
    GPT-2's gelu_new alone becomes the same function in one kernel."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from trainer.model.gpt2 import ACTIVATION, load_pretrained, model_from_config_file
    for saved, built in (("gelu", "gelu"), ("gelu_new", ACTIVATION), ("relu", "relu")):
        config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=65, activation_function=saved)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / saved)
        config.to_json_file(tmp_path / f"{saved}.json")
        for model in (load_pretrained(str(tmp_path / saved), 0.0), model_from_config_file(tmp_path / f"{saved}.json")):
            assert model.config.activation_function == built


def test_what_cannot_be_read_is_one_line(tmp_path):
    from trainer.errors import UserError
    from trainer.model.gpt2 import load_pretrained
    from trainer.model.nanogpt import find_meta
    from trainer.tools.export import export
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read as a nanoGPT checkpoint"):
        load_pretrained(str(tmp_path), 0.0)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a nanoGPT checkpoint \\(a dict with 'model' and 'model_args'"):
        load_pretrained(str(tmp_path / "other.pt"), 0.0)
    # another model's weights under nanoGPT's keys
    out = write_nanogpt_checkpoint(tmp_path / "extra")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.gate.weight"] = torch.zeros(1)
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(UserError, match="does not hold nanoGPT's GPT of its model_args .*unexpected "
                                        "\\['transformer.h.0.mlp.gate.weight'\\]"):
        load_pretrained(str(out), 0.0)
    # a character model whose dataset's meta.pkl is nowhere near
    lone = write_nanogpt_checkpoint(tmp_path / "lone", dataset="no_such_dataset")
    with pytest.raises(UserError, match="is a character model \\(vocab_size 65\\) and its vocabulary, the meta.pkl of "
                                        "its dataset 'no_such_dataset', is in none of .*; copy that meta.pkl next to "
                                        "ckpt.pt or run from nanoGPT's folder"):
        find_meta(lone / "ckpt.pt")
    with pytest.raises(UserError, match="is a nanoGPT checkpoint: a whole model, without adapters; export it without "
                                        "--adapter_only"):
        export(lone, tmp_path / "exp", adapter_only=True)


# ----------------------------------------------------------------------------- the commands, for real

@pytest.fixture(scope="module")
def nanogpt_clone(data_dir, tmp_path_factory):
    """A nanoGPT folder as its train.py leaves it: out-shakespeare-char/ckpt.pt (bias=False, compiled names)
    and data/shakespeare_char/ (train.bin, val.bin, meta.pkl) beside it."""
    import shutil
    root = tmp_path_factory.mktemp("nanoGPT")
    shutil.copytree(data_dir / "shakespeare_char", root / "data" / "shakespeare_char")
    write_nanogpt_checkpoint(root / "out-shakespeare-char", bias=False, compiled=True)
    return root


@pytest.fixture(scope="module")
def exported(nanogpt_clone, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("exports") / "nanogpt-char"
    proc = run_cmd(python(REPO / "launch/merge_adapter.py", f"--out_dir={nanogpt_clone / 'out-shakespeare-char'}",
                          f"--export_dir={export_dir}"), cwd=REPO)
    return export_dir, proc.stdout


@pytest.mark.slow
def test_export_of_a_nanogpt_checkpoint_gives_nanogpts_logits(nanogpt_clone, exported):
    from transformers import AutoModelForCausalLM
    export_dir, stdout = exported
    assert "nanoGPT checkpoint" in stdout and ": ok" in stdout
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    assert model.config.activation_function == "gelu"
    with open(export_dir / "meta.pkl", "rb") as f:  # the characters travel with the export
        assert len(pickle.load(f)["stoi"]) == CHAR_VOCAB
    sd = torch.load(nanogpt_clone / "out-shakespeare-char" / "ckpt.pt", weights_only=True)["model"]
    idx = torch.randint(0, CHAR_VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=idx).logits.double()
    assert (ours - nanogpt_forward(sd, idx, n_head=2)).abs().max() < ATOL


@pytest.mark.slow
def test_sample_and_eval_read_a_nanogpt_out_dir(nanogpt_clone):
    out = nanogpt_clone / "out-shakespeare-char"
    proc = run_cmd(python(REPO / "launch/sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1",
                          "--max_new_tokens=20", "--device=cpu"), cwd=REPO)
    text = proc.stdout.split("---------------")[0]
    assert text.startswith("ROMEO:") and len(text.strip()) >= 20  # decoded through data/shakespeare_char/meta.pkl
    # eval.py: nanoGPT's dataset, found beside its out_dir, evaluated with the model's characters
    proc = run_cmd(python(REPO / "launch/eval.py", f"--out_dir={out}", "--device=cpu", "--batch_size=64"), cwd=REPO)
    assert re.search(r"shakespeare_char val \(all tokens\): loss [\d.]+, perplexity", proc.stdout), proc.stdout


@pytest.mark.slow
def test_finetune_from_a_nanogpt_checkpoint_keeps_its_architecture(nanogpt_clone, exported, data_dir, tmp_path):
    import json
    from safetensors.torch import load_file
    out = nanogpt_clone / "out-shakespeare-char"
    short = ["--max_iters=2", "--eval_interval=2", "--eval_iters=2", "--always_save_checkpoint=True",
             "--block_size=32"]
    proc = run_cmd(python(*train_args(data_dir, tmp_path / "ft", f"--init_from={out}", *short)), cwd=REPO)
    assert "nanoGPT's checkpoint of iteration 250 (best val loss 1.4697)" in proc.stdout
    assert "its weights only: the optimizer starts fresh at iteration 0" in proc.stdout
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["bias"] is False  # the checkpoint's
    saved = json.loads((tmp_path / "ft" / "model_config.json").read_text())
    assert saved["activation_function"] == "gelu" and saved["n_layer"] == 2 and saved["n_positions"] == 32
    # the same weights as the export of the checkpoint: the same val loss at iteration 0, on the same windows
    proc_hf = run_cmd(python(*train_args(data_dir, tmp_path / "hf", f"--init_from={exported[0]}", "--eval_only=True",
                                         *short)), cwd=REPO)
    first = lambda stdout: re.search(r"step 0: train loss ([\d.]+), val loss ([\d.]+)", stdout).groups()  # noqa: E731
    assert first(proc.stdout) == first(proc_hf.stdout)
    # trained, then exported: still nanoGPT's architecture (exact GELU, its biases zero and never trained)
    run_cmd(python(REPO / "launch/merge_adapter.py", f"--out_dir={tmp_path / 'ft'}",
                   f"--export_dir={tmp_path / 'exp'}"), cwd=REPO)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["activation_function"] == "gelu"
    weights = load_file(tmp_path / "exp" / "model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith(".bias")]
    assert biases and not any(b.any() for b in biases)


@pytest.mark.slow
def test_adapters_on_a_nanogpt_checkpoint_export_merged_only(data_dir, tmp_path):
    """A peft adapter directory names its base for PeftModel.from_pretrained, which cannot read a ckpt.pt: the
    adapter-only export of LoRA on a nanoGPT checkpoint is one line naming the merged export, which works."""
    write_nanogpt_checkpoint(tmp_path / "nano", bias=True)
    run_cmd(python(*train_args(data_dir, tmp_path / "lora", f"--init_from={tmp_path / 'nano'}", "--mode=lora",
                               "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--block_size=32",
                               "--always_save_checkpoint=True")), cwd=REPO)
    merge = [REPO / "launch/merge_adapter.py", f"--out_dir={tmp_path / 'lora'}"]
    proc = run_cmd(python(*merge, f"--export_dir={tmp_path / 'adapters'}", "--adapter_only"), cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'lora'} trained adapters on the nanoGPT checkpoint {tmp_path / 'nano'}, which "
        f"PeftModel.from_pretrained cannot load as a base; export the merged model without --adapter_only (or export "
        f"the checkpoint with merge_adapter.py and train the adapters on that)")
    assert not (tmp_path / "adapters").exists()
    assert ": ok" in run_cmd(python(*merge, f"--export_dir={tmp_path / 'merged'}"), cwd=REPO).stdout
