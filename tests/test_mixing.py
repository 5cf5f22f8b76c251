"""Dataset mixing: configured shares, one global draw for every rank, checkpointable state, config keys."""
import json
import pickle
import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, make_tiny_gpt2, python, run_cmd
from trainer.config import Config, ConfigError, resolve_config
from trainer.data.mixing import MixedData, mix_probabilities, open_data
from trainer.data.sampler import TrainSampler
from trainer.prepare.instructions import prepare_instructions

BLOCK = 16


def write_text_dataset(folder, n_tokens, low):
    """A GPT-2-token dataset whose tokens all lie in [low, low + 100): a window tells its dataset."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(low)
    for split, n in (("train", n_tokens), ("val", max(BLOCK + 1, n_tokens // 10))):
        rng.integers(low, low + 100, size=n).astype(np.uint16).tofile(folder / f"{split}.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16"}, f)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for name, size, low in (("small", 2_000, 1000), ("medium", 8_000, 2000), ("large", 32_000, 3000)):
        write_text_dataset(root / name, size, low)
    return root


def drawn_shares(data, seed, iterations=100, sequences=64):
    """Shares measured from the windows' contents (each dataset has its own token range)."""
    sampler = TrainSampler(data, seed)
    counts = np.zeros(len(data.names))
    for _ in range(iterations):
        for x, y in sampler.iteration(sequences, 0, 1, 16).batches:
            counts += np.bincount((x[:, 0].numpy() // 1000) - 1, minlength=len(counts))
    assert list(counts) == sampler.drawn  # the logged counters are what was drawn
    return counts / counts.sum(), counts.sum()


@pytest.mark.parametrize("mix, expected", [
    ("proportional", [2 / 42, 8 / 42, 32 / 42]),
    ("temperature:2", np.sqrt([2, 8, 32]) / np.sqrt([2, 8, 32]).sum()),  # size^(1/2): 1 : 2 : 4
    ("temperature:1e9", [1 / 3] * 3),  # very hot: uniform
])
def test_mixing_gives_the_configured_shares(three, mix, expected):
    cfg = Config(dataset=["small", "medium", "large"], data_dir=str(three), block_size=BLOCK, mix=mix)
    data = open_data(cfg)
    assert isinstance(data, MixedData) and data.names == ["small", "medium", "large"]
    assert np.allclose(data.probs, expected, atol=1e-6)
    shares, n = drawn_shares(data, seed=7)
    sigma = np.sqrt(np.asarray(expected) * (1 - np.asarray(expected)) / n)
    assert np.all(np.abs(shares - expected) < 4 * sigma), (shares, expected, n)  # within sampling error


def test_a_mixture_needs_one_tokenizer(three):
    chars = three / "chars"
    chars.mkdir()
    np.zeros(100, dtype=np.uint16).tofile(chars / "train.bin")
    np.zeros(100, dtype=np.uint16).tofile(chars / "val.bin")
    with open(chars / "meta.pkl", "wb") as f:
        pickle.dump({"tokenizer": "char", "vocab_size": 3, "dtype": "uint16", "stoi": {"a": 0}, "itos": {0: "a"}}, f)
    with pytest.raises(Exception, match=re.escape("the datasets of a mixture must share one tokenizer (small: gpt2 "
                                                  "(50257), chars: char (3)); prepare them all with the same")):
        open_data(Config(dataset=["small", "chars"], data_dir=str(three), block_size=BLOCK, mix="proportional"))


def test_mix_probabilities_formula():
    assert np.allclose(mix_probabilities([100, 400], "proportional"), [0.2, 0.8])
    assert np.allclose(mix_probabilities([100, 400], "temperature:2"), [1 / 3, 2 / 3])
    assert np.allclose(mix_probabilities([100, 400], "temperature:0.5"), [1 / 17, 16 / 17])


def test_sampler_is_global_across_ranks_and_checkpointable(three):
    cfg = Config(dataset=["small", "large"], data_dir=str(three), block_size=BLOCK, mix="temperature:3")
    data = open_data(cfg)
    whole = TrainSampler(data, 11)
    ranks = [TrainSampler(data, 11) for _ in range(2)]
    for _ in range(5):
        (x_all, y_all), = whole.iteration(8, 0, 1, 8).batches
        parts = [s.iteration(8, r, 2, 4).batches[0] for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x_all)  # each rank takes its slice of one draw
        assert ranks[0].drawn == ranks[1].drawn == whole.drawn
    state = pickle.loads(pickle.dumps(whole.state_dict()))  # a plain picklable dict in the checkpoint
    assert isinstance(state, dict) and state["drawn"] == whole.drawn
    later = [whole.iteration(8, 0, 1, 8).batches[0][0] for _ in range(3)]
    resumed = TrainSampler(data, 11)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.iteration(8, 0, 1, 8).batches[0][0], x) for x in later)
    assert resumed.shares() == whole.shares()


def test_old_sampler_state_still_loads(three):
    data = open_data(Config(dataset="small", data_dir=str(three), block_size=BLOCK))
    fresh = TrainSampler(data, 3)
    old = TrainSampler(data, 99)
    old.load_state_dict(np.random.Generator(np.random.PCG64(3)).bit_generator.state)  # saved before mixing
    assert torch.equal(old.iteration(4, 0, 1, 4).batches[0][0], fresh.iteration(4, 0, 1, 4).batches[0][0])


def test_mixed_instruction_and_text_batches(three, tmp_path):
    records = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe", "never", "always")] * 4
    (tmp_path / "i.json").write_text(json.dumps(records))
    prepare_instructions(str(tmp_path / "i.json"), three / "instr", block_size=BLOCK, template_name="plain")
    data = open_data(Config(dataset=["instr", "large"], data_dir=str(three), block_size=BLOCK, mix="proportional"))
    offsets = data.eval_offsets("val", 40, 1337)
    x, y, pos = data.windows("val", offsets)
    from_text = (x[:, 0] >= 3000) & (x[:, 0] < 3100)  # the "large" text dataset's token range
    assert from_text.any() and (~from_text).any()
    assert (pos[from_text] == torch.arange(BLOCK)).all()  # a text window is one sequence
    assert (pos[~from_text][:, 0] == 0).all() and (pos[~from_text] < BLOCK).all()
    assert ((y[from_text] != -100).all())
    # the loss tokens the sampler counts for token-weighted updates: those of each window's own targets
    assert data.loss_tokens("val", offsets) == int((y != -100).sum()) < len(offsets) * BLOCK


@pytest.mark.parametrize("args, message", [
    (["--dataset=[]"], "must be a name or a non-empty list of names"),
    (["--dataset=['a', 3]"], "must be a name or a non-empty list of names"),
    (["--mix=temperature"], "must be 'proportional' or 'temperature:T' with T > 0"),
    (["--mix=temperature:0"], "must be 'proportional' or 'temperature:T' with T > 0"),
    (["--mix=uniform"], "must be 'proportional' or 'temperature:T' with T > 0"),
    (["--max_epochs=-1"], "must be 0 (off: use max_iters) or more"),
])
def test_mixing_config_errors(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(args)


def test_mixing_config_accepts_lists_and_temperatures():
    cfg, _ = resolve_config(["--dataset=['alpaca', 'shakespeare']", "--mix=temperature:2.5", "--max_epochs=3"])
    assert cfg.dataset == ["alpaca", "shakespeare"] and cfg.mix == "temperature:2.5"
    assert cfg.max_epochs == 3.0
    assert resolve_config(["--dataset=shakespeare"])[0].dataset == "shakespeare"


@pytest.mark.slow
def test_training_on_a_mixture_logs_realised_shares(three, tmp_path):
    tiny = tmp_path / "tiny"
    make_tiny_gpt2(tiny, n_layer=1, n_head=2, n_embd=16, n_positions=BLOCK)
    out = tmp_path / "out"
    proc = run_cmd(python(REPO / "launch/train.py", f"--init_from={tiny}", "--dataset=['small', 'large']",
                          "--mix=temperature:2", f"--data_dir={three}", f"--out_dir={out}", f"--block_size={BLOCK}",
                          "--batch_size=8", "--gradient_accumulation_steps=1", "--max_iters=6", "--eval_interval=6",
                          "--eval_iters=1", "--log_interval=3", "--mode=full", "--sample_max_new_tokens=0"),
                   cwd=tmp_path)
    assert "mixing datasets (temperature:2): small 0.200 (2,000 tokens), large 0.800 (32,000 tokens)" in proc.stdout
    lines = re.findall(r"data shares: small ([\d.]+), large ([\d.]+) \(of (\d+) windows\)", proc.stdout)
    assert [int(n) for *_, n in lines] == [24, 48]
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    small = acc.Scalars("data/share/small")
    assert [e.step for e in small] == [3, 6]
    assert abs(small[-1].value - float(lines[-1][0])) < 1e-3
    assert abs(small[-1].value + acc.Scalars("data/share/large")[-1].value - 1) < 1e-6
