"""The model: loading through init_from, cropping, dropout, vocab padding, the chunked loss."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from trainer.config import Config
from trainer.errors import UserError
from trainer.model.gpt2 import build_model
from trainer.model.loss import LMWithLoss, chunked_lm_loss
from trainer.model.shapes import Shape, model_shape, padded_vocab


def cfg_with(**kw):
    return Config(**kw)


def test_local_hf_dir_gives_the_same_logits_as_transformers(tiny_gpt2_dir):
    ours = build_model(cfg_with(init_from=str(tiny_gpt2_dir), block_size=128), 50257).eval()
    theirs = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=idx).logits, theirs(input_ids=idx).logits
    assert ours.config._attn_implementation == "sdpa"
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_block_size_crops_positions_and_dropout_overrides(tiny_gpt2_dir):
    model = build_model(cfg_with(init_from=str(tiny_gpt2_dir), block_size=64, dropout=0.1), 50257)
    full = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    assert model.transformer.wpe.weight.shape == (64, 32)
    assert torch.equal(model.transformer.wpe.weight, full.transformer.wpe.weight[:64])
    assert model.config.n_positions == 64
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.1, 0.1, 0.1)
    # cropped positions still give the same logits on short inputs
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=idx).logits, full.eval()(input_ids=idx).logits, atol=1e-5)


def test_block_size_above_the_checkpoint_is_refused(tiny_gpt2_dir):
    with pytest.raises(UserError, match="block_size=256 is larger than the model's 128 positions"):
        build_model(cfg_with(init_from=str(tiny_gpt2_dir), block_size=256), 50257)


def test_scratch_model_shape_and_padded_vocab():
    cfg = cfg_with(n_layer=3, n_head=2, n_embd=64, block_size=32, dropout=0.2)
    model = build_model(cfg, 65)
    assert padded_vocab(65) == 128 and padded_vocab(50257) == 50304
    assert model.config.vocab_size == 128 and model.config.n_positions == 32
    assert len(model.transformer.h) == 3 and model.config.n_head == 2 and model.config.resid_pdrop == 0.2
    assert model_shape(cfg, 65) == Shape(n_layer=3, n_head=2, n_embd=64, vocab_size=128, block_size=32)
    assert model_shape(cfg_with(init_from="gpt2-xl"), 50257).n_layer == 48


def test_bias_false_zeroes_and_freezes_every_bias():
    model = build_model(cfg_with(n_layer=1, n_head=2, n_embd=32, block_size=16, bias=False), 65)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases and all(not p.requires_grad and p.abs().sum() == 0 for p in biases)


def test_init_from_bad_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="neither scratch, resume, a GPT-2 hub name"):
        build_model(cfg_with(init_from=str(tmp_path)), 50257)


@pytest.mark.parametrize("chunk_bytes", [10**9, 4 * 100 * 7])  # one chunk, and many chunks of 7 tokens
def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradient(chunk_bytes):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 100, bias=False)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    targets = torch.randint(0, 100, (3, 20))
    targets[0, :5] = -100  # masked positions carry no loss
    loss = chunked_lm_loss(head, hidden, targets, chunk_bytes=chunk_bytes)
    loss.backward()
    g_hidden, g_head = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    ref = F.cross_entropy(head(hidden).view(-1, 100), targets.view(-1), ignore_index=-100)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(g_hidden, hidden.grad, atol=1e-6)
    assert torch.allclose(g_head, head.weight.grad, atol=1e-6)


def test_lm_with_loss_matches_transformers_loss(tiny_gpt2_dir):
    lm = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = LMWithLoss(lm)(idx[:, :-1], idx[:, 1:])
        theirs = lm(input_ids=idx, labels=idx).loss  # HF shifts the labels itself
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_every_model_uses_the_fused_tanh_gelu_which_matches_gpt2s_gelu_new(tiny_gpt2_dir, tmp_path):
    """gelu_pytorch_tanh (one kernel) vs gelu_new (GPT-2's Python formula): the same function."""
    from transformers.activations import ACT2FN
    from trainer.model.gpt2 import ACTIVATION, model_from_config_file
    scratch = build_model(cfg_with(n_layer=1, n_head=2, n_embd=32, block_size=16), 65)
    pretrained = build_model(cfg_with(init_from=str(tiny_gpt2_dir), block_size=128), 50257)
    theirs = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    assert theirs.config.activation_function == "gelu_new"  # as saved, like GPT-2's hub configs
    theirs.config.to_json_file(tmp_path / "model_config.json")
    rebuilt = model_from_config_file(tmp_path / "model_config.json")
    for model in (scratch, pretrained, rebuilt):
        assert model.config.activation_function == ACTIVATION == "gelu_pytorch_tanh"
        assert type(model.transformer.h[0].mlp.act) is type(ACT2FN[ACTIVATION])
    x = torch.linspace(-20, 20, 400_001)
    exact = ACT2FN["gelu_new"](x.double())
    assert (ACT2FN[ACTIVATION](x) - ACT2FN["gelu_new"](x)).abs().max() <= 5e-7  # measured 4.8e-7 in fp32
    for dtype in (torch.bfloat16, torch.float16):
        fused, new = ACT2FN[ACTIVATION](x.to(dtype)).double(), ACT2FN["gelu_new"](x.to(dtype)).double()
        # at most one rounding step (eps * max(|y|, 1)) apart in 16 bits: bf16 max 0.0156, fp16 0.00195;
        # both are as far from the exact function (the rounding of x itself dominates)
        step = torch.finfo(dtype).eps * exact.abs().clamp(min=1)
        assert ((fused - new).abs() <= step).all()
        assert (fused - exact).abs().max() <= (new - exact).abs().max()
