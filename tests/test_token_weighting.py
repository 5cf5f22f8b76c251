"""Token-weighted updates: an iteration's update is the mean over every loss token of the iteration.

On response-only masked (packed instruction) data the micro-batches of one iteration hold different
numbers of loss tokens. Each micro-batch's loss is multiplied by its token weight
(trainer/model/loss.token_weight), so however the iteration is split (micro-batch 16; micro-batch 2 x 8
accumulation; 2 ranks; an out-of-memory step-down from 16 to 8 x 2) the update is the same up to the
order of floating-point sums. Pretraining (every micro-batch holds the same number of loss tokens) keeps
today's arithmetic exactly: the weight is exactly 1.0 and the loss is passed on untouched.

Measured on this file's data and runs (2 CPU cores), TensorBoard's val loss after 40 iterations: before
(each micro-batch its own mean) micro-batch 16: 6.741254, 2 x 8: 6.748010, 2 ranks (ZeRO-2): 6.739565,
step-down: 6.741858 (off by 6.8e-3, 1.7e-3 and 6.0e-4); token-weighted: all four within 1e-6 of 6.741254,
micro-batch 16 (one micro-batch: weight 1.0) bit for bit what it was; 2 ranks under ZeRO-3 too.
"""
import json
import random

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, deepspeed_cmd, python, run_cmd, tb_scalars
from trainer.data.mixing import open_data
from trainer.data.sampler import TrainSampler
from trainer.data.tokenizer import IGNORE_INDEX
from trainer.model.loss import token_weight, token_weighted
from trainer.prepare.instructions import prepare_instructions
from trainer.config import Config

ITERS = 40
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "tiger", "paper", "music", "light", "sand", "north"]
TOLERANCE = 5e-6  # float reordering; the unweighted splits differ by 6e-4 to 7e-3 (module docstring)


def records(n=400, seed=0):
    """Alpaca-style records whose responses have 1 to 9 words: micro-batches hold unequal loss tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
        out.append({"instruction": "Sort these words.", "input": " ".join(words), "output": " ".join(sorted(words))})
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighting")
    (root / "sort.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    prepare_instructions(str(root / "sort.jsonl"), root / "sort", block_size=64, val_fraction=0.1,
                         template_name="plain")
    return root


def args(root, tiny, out, *extra):
    return [REPO / "launch/train.py", f"--init_from={tiny}", "--dataset=sort", f"--data_dir={root}",
            f"--out_dir={out}", "--block_size=64", "--batch_size=16", "--gradient_accumulation_steps=1",
            f"--max_iters={ITERS}", f"--eval_interval={ITERS}", "--eval_iters=2", "--log_interval=1",
            "--learning_rate=3e-3", "--warmup_iters=5", f"--lr_decay_iters={ITERS}", "--weight_decay=0.0",
            "--mode=full", "--dropout=0.0", "--sample_max_new_tokens=0", *extra]


def curves(out):
    """(final val loss, {iteration: logged train loss}) from TensorBoard (fp32, more digits than the console)."""
    return tb_scalars(out, "eval/val_loss")[ITERS], tb_scalars(out, "train/loss")


def answers(out):
    """eval_generate's scores at the last evaluation, and the answers logged as text at each."""
    events = EventAccumulator(str(out), size_guidance={"tensors": 0})
    events.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("answers/text_summary")]
    return {tag: tb_scalars(out, f"eval/{tag}")[ITERS] for tag in ("exact_match", "rougeL", "bleu")}, texts


@pytest.fixture(scope="module")
def one_micro_batch(packed, tiny_gpt2_dir):
    out = packed / "m16"
    run_cmd(python(*args(packed, tiny_gpt2_dir, out, "--micro_batch_size=16", "--eval_generate=4")), cwd=REPO)
    return curves(out), answers(out)


def assert_same_training(got, want):
    val, train = got
    assert abs(val - want[0]) < TOLERANCE, (val, want[0])
    assert train.keys() == want[1].keys() == set(range(1, ITERS + 1))
    assert max(abs(train[i] - want[1][i]) for i in train) < TOLERANCE, (train, want[1])


@pytest.mark.slow
@pytest.mark.parametrize("split", ["accumulation", "ranks", "oom_step_down"])
def test_packed_instruction_updates_do_not_depend_on_the_split(packed, tiny_gpt2_dir, one_micro_batch, split, tmp_path):
    """Micro-batch 16 = micro-batch 2 x 8 accumulation = 2 ranks (ZeRO-3) of 8 = a step-down 16 -> 8 x 2 at
    iteration 3: the same val loss and the same logged train loss at every iteration, within float reordering."""
    out = tmp_path / "out"
    if split == "accumulation":
        proc = run_cmd(python(*args(packed, tiny_gpt2_dir, out, "--micro_batch_size=2")), cwd=REPO)
        assert "micro-batch 2 x 8 accumulation x 1 ranks" in proc.stdout
    elif split == "ranks":  # ZeRO-3, whose forward passes are collective: eval_generate's answers too
        proc = run_cmd(deepspeed_cmd(*args(packed, tiny_gpt2_dir, out, "--micro_batch_size=8", "--zero_stage=3",
                                           "--eval_generate=4"), num_gpus=2), cwd=REPO)
        assert "micro-batch 8 x 1 accumulation x 2 ranks" in proc.stdout
        scores, texts = answers(out)
        assert len(texts) == 2 and texts == one_micro_batch[1][1] and "### answer" in texts[0]  # iterations 0, 40
        assert scores == one_micro_batch[1][0]
    else:
        proc = run_cmd(python(*args(packed, tiny_gpt2_dir, out, "--gradient_checkpointing=True")), cwd=REPO,
                       env={"GPT2DS_INJECT_OOM": "3"})
        assert "iteration 3: out of memory with full, ZeRO-0, checkpointing, micro-batch 16: micro-batch 16 -> 8, " \
               "accumulation 2 per rank" in proc.stdout
    assert_same_training(curves(out), one_micro_batch[0])
    assert one_micro_batch[0][0] < 8.0  # it trained (the tiny random GPT-2 starts near ln(50257) = 10.8)


def iteration_token_counts(data, split_by, iterations=5):
    """[(iteration's loss tokens, [loss tokens of each micro-batch of every rank])] for a split of 16 sequences."""
    micro, world = split_by
    samplers = [TrainSampler(data, 7) for _ in range(world)]
    out = []
    for _ in range(iterations):
        per_rank = [s.iteration(16, rank, world, micro) for rank, s in enumerate(samplers)]
        assert len({it.loss_tokens for it in per_rank}) == 1  # every rank counts the same total, alone
        counts = [int((y != IGNORE_INDEX).sum()) for it in per_rank for _, y, *_ in it.batches]
        out.append((per_rank[0].loss_tokens, counts))
    return out


@pytest.mark.parametrize("split_by", [(16, 1), (2, 1), (8, 2), (1, 4)])
def test_pretraining_weights_are_exactly_one(data_dir, split_by):
    """Unmasked text: every micro-batch of every split holds the same number of loss tokens, so every weight is
    exactly 1.0 and token_weighted hands back the very loss tensor it was given: today's arithmetic, bit for bit."""
    data = open_data(Config(dataset="shakespeare_char", data_dir=str(data_dir), block_size=64))
    micro, world = split_by
    for total, counts in iteration_token_counts(data, split_by):
        assert total == 16 * 64 and counts == [micro * 64] * (16 // micro)
        for n in counts:
            assert token_weight(n, total, 16 // micro) == 1.0
            loss = torch.tensor(2.5, requires_grad=True) * 1.3
            assert token_weighted(loss, n, total, 16 // micro) is loss


def test_packed_weights_make_the_iteration_mean(packed):
    """Packed instruction data: the weighted micro-batch means, averaged as DeepSpeed averages them (over the
    accumulation steps and the ranks), are the mean over every loss token of the iteration."""
    data = open_data(Config(dataset="sort", data_dir=str(packed), block_size=64))
    rng = np.random.default_rng(0)
    for split_by in ((16, 1), (2, 1), (8, 2), (1, 4)):
        micro, world = split_by
        micro_batches = 16 // micro  # accumulation steps per rank x ranks
        iterations = iteration_token_counts(data, split_by)
        assert micro_batches == 1 or any(len(set(counts)) > 1 for _, counts in iterations)  # weighting matters
        for total, counts in iterations:
            assert sum(counts) == total
            token_losses = [rng.random(n) for n in counts]
            means = [torch.tensor(t.mean() if len(t) else 0.0, dtype=torch.float64) for t in token_losses]
            update = sum(float(token_weighted(m, n, total, micro_batches)) for m, n in zip(means, counts))
            assert update / micro_batches == pytest.approx(np.concatenate(token_losses).mean(), rel=1e-12)
