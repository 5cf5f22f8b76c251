"""A reference for the shakespeare_char_cpu benchmark: nanoGPT's model and procedure, written plainly.

nanoGPT's README quotes "about 1.88" for its CPU settings: one run, measured with its own estimator
(20 random val batches of 12). To compare our trainer with nanoGPT on this machine, seed by seed, this
module trains what nanoGPT trains there:
- its model: pre-LayerNorm blocks without biases (its default bias=False, LayerNorms too), exact GELU,
  weights N(0, 0.02) with the residual projections at 0.02/sqrt(2 * n_layer), the output layer tied to
  the token embedding, a vocabulary of 65 characters (nanoGPT pads only GPT-2's vocabulary);
- its procedure: batches of random windows drawn with torch.randint, AdamW with weight decay on 2-D
  weights, warmup + cosine schedule, gradient clipping at 1.0.
The hyperparameters come from our own recipe, so the two can not drift apart.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_attn = nn.LayerNorm(n_embd, bias=False)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_out = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_mlp = nn.LayerNorm(n_embd, bias=False)
        self.mlp_in = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_out = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        batch, time, width = x.shape
        heads = [t.view(batch, time, self.n_head, width // self.n_head).transpose(1, 2)
                 for t in self.qkv(self.ln_attn(x)).split(width, dim=-1)]
        attended = F.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_final = nn.LayerNorm(n_embd, bias=False)
        residual_std = 0.02 / math.sqrt(2 * n_layer)  # two residual additions per block
        for name, param in self.named_parameters():
            if param.dim() == 2:
                nn.init.normal_(param, 0.0, residual_std if name.endswith(("attn_out.weight", "mlp_out.weight"))
                                else 0.02)

    def forward(self, idx):
        h = self.token_embedding(idx) + self.position_embedding(torch.arange(idx.size(1)))
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_final(h), self.token_embedding.weight)  # tied output layer


def random_windows(tokens, block_size, batch_size, generator):
    """nanoGPT's batches: windows starting at uniformly random positions."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    rows = np.stack([tokens[s:s + block_size + 1].astype(np.int64) for s in starts])
    return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


def mean_loss(model, batches):
    """Mean token loss over (x, y) batches (every batch weighted by its tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return total / count


def train_reference(cfg, train_tokens, vocab_size, seed, lr_at):
    """nanoGPT's training for cfg's hyperparameters; returns the model after cfg.max_iters steps."""
    torch.manual_seed(seed)
    model = ReferenceGPT(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(seed)
    for it in range(cfg.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        x, y = random_windows(train_tokens, cfg.block_size, cfg.batch_size, generator)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()
