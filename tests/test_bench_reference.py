"""bench/nanogpt_reference.py, the nanoGPT model and procedure the shakespeare_char_cpu benchmark compares with."""
import math

import pytest
import torch

from bench.nanogpt_reference import ReferenceGPT, mean_loss, random_windows, train_reference
from trainer.config import resolve_config
from trainer.data.tokens import TokenData
from trainer.optim.schedule import lr_at
from trainer.tools.evaluate import stream_batches


def test_reference_model_is_nanogpts_shape():
    model = ReferenceGPT(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())  # nanoGPT's bias=False
    # 4 layers x 12 * 128^2 matmuls + tied 65 x 128 embedding + 64 x 128 positions + 9 LayerNorm weights
    assert sum(p.numel() for p in model.parameters()) == 4 * 12 * 128 ** 2 + 65 * 128 + 64 * 128 + 9 * 128
    residual = torch.cat([b.mlp_out.weight.flatten() for b in model.blocks] + [b.attn_out.weight.flatten() for b in model.blocks])
    assert abs(residual.std().item() - 0.02 / math.sqrt(8)) < 5e-4
    assert abs(model.blocks[0].qkv.weight.std().item() - 0.02) < 5e-4


@pytest.mark.slow
def test_reference_procedure_learns_shakespeare(data_dir):
    cfg, _ = resolve_config(["--recipe", "shakespeare_char_cpu", "--max_iters=60", "--lr_decay_iters=60",
                             "--warmup_iters=5"])
    data = TokenData(data_dir / "shakespeare_char", cfg.block_size)
    model = train_reference(cfg, data.tokens["train"], data.vocab_size, seed=1, lr_at=lr_at)
    whole = mean_loss(model, stream_batches(data.tokens["val"][:20000], cfg.block_size, 64))
    sampled = mean_loss(model, [random_windows(data.tokens["val"], 64, 12, torch.Generator().manual_seed(0))
                                for _ in range(5)])
    assert whole < 3.0 < math.log(65), whole  # from ln(65) = 4.17 at the start
    assert abs(sampled - whole) < 0.2
