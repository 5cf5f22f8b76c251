"""Instruction data: prepare, masks, packing, sealed attention, and a tiny GPT-2 that learns a task."""
import json
import math
import pickle
import random
import re

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_gpt2, python, run_cmd, tb_scalars
from trainer.data.tokenizer import GPT2_EOT, IGNORE_INDEX, Gpt2Tokenizer
from trainer.data.tokens import TokenData
from trainer.errors import UserError
from trainer.model.attention import packed_causal_mask
from trainer.model.loss import LMWithLoss
from trainer.prepare import instructions
from trainer.prepare.instructions import prepare_instructions
from trainer.prepare.packing import layout, pack
from trainer.prepare.records import parse_columns, render, tokenize
from trainer.prepare.split import split_indices
from trainer.prepare.templates import TEMPLATES

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
]
CHAT = {"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."},
                     {"role": "user", "content": "And of Italy?"},
                     {"role": "assistant", "content": "Rome."}]}


def load_split(folder, split):
    meta = pickle.loads((folder / "meta.pkl").read_bytes())
    tokens = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(folder / f"{split}_mask.bin", dtype=np.uint8)
    pos = np.fromfile(folder / f"{split}_pos.bin", dtype=np.uint16).astype(np.int64)
    return meta, tokens, mask, pos


def examples_of(tokens, mask, pos):
    """The packed examples of a split: runs starting at position 0 that carry loss (padding does not)."""
    starts = list(np.nonzero(pos == 0)[0]) + [len(tokens)]
    return [(tokens[a:b], mask[a:b]) for a, b in zip(starts, starts[1:]) if mask[a:b].any()]


def test_sample_input_renders_the_prompt_as_the_prepared_data(tmp_path):
    """sample.py --prompt_template=alpaca --start=INSTRUCTION --input=INPUT asks with exactly the prompt tokens
    data/prepare.py wrote for such a record (the mask-0 part of each example)."""
    from launch.sample import instruction_ids, template_for
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    (tmp_path / "r.json").write_text(json.dumps([record, {**record, "input": "   "}]))
    run_cmd(python(REPO / "data/prepare.py", f"--input={tmp_path / 'r.json'}", "--name=r", "--format=instructions",
                   "--block_size=128", "--val_fraction=0.5", f"--data_dir={tmp_path}"), cwd=tmp_path)
    prompts = []
    for split in ("train", "val"):
        _, tokens, mask, pos = load_split(tmp_path / "r", split)
        prompts += [ids[m == 0].tolist() for ids, m in examples_of(tokens, mask, pos)]
    tok = Gpt2Tokenizer()
    template = template_for("alpaca", tok)
    with_input = instruction_ids(tok, template, record["instruction"], record["input"])
    blank_input = instruction_ids(tok, template, record["instruction"], "   ")  # white space counts as no input
    assert sorted(prompts) == sorted([with_input, blank_input]) and with_input != blank_input
    assert tok.decode(with_input).endswith("### Input:\nGood morning\n\n### Response:\n")


# ---------------------------------------------------------------- prepare

def test_prepare_alpaca_and_chat_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text(json.dumps(ALPACA))
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps(CHAT) + "\n\n" + json.dumps(ALPACA[0]) + "\n")
    proc = run_cmd(python(REPO / "data/prepare.py", f"--input={tmp_path / 'in'}", "--name=instr",
                          "--format=instructions", "--block_size=128", "--val_fraction=0.2",
                          f"--data_dir={tmp_path}"), cwd=tmp_path)
    out = proc.stdout
    assert "read 6 examples from 2 file(s) (5 alpaca, 1 chat), template alpaca" in out
    assert re.search(r"train: 5 examples in \d+ blocks of 129 tokens = [\d,]+ tokens; [\d.]+% carry loss", out)
    assert "longer than block_size + 1 = 129 tokens: 0 example(s)" in out

    folder = tmp_path / "instr"
    tok = Gpt2Tokenizer()
    responses = []
    for split in ("train", "val"):
        meta, tokens, mask, pos = load_split(folder, split)
        assert len(tokens) % 129 == 0 and len(tokens) == len(mask) == len(pos)
        for ids, m in examples_of(tokens, mask, pos):
            # mask 1 exactly on the response pieces, each ending in <|endoftext|>; the prompt is mask 0
            assert m[0] == 0 and m[-1] == 1 and ids[-1] == GPT2_EOT
            responses.append(tok.decode(ids[m == 1].tolist()))
    assert meta["format"] == "instructions" and meta["block_size"] == 128 and meta["template"] == "alpaca"
    assert sorted(responses) == sorted([r["output"] + "<|endoftext|>" for r in ALPACA + ALPACA[:1]]
                                       + ["Paris.<|endoftext|>Rome.<|endoftext|>"])


def test_alpaca_template_is_stanford_alpaca():
    pieces = render(ALPACA[1], TEMPLATES["alpaca"])
    assert pieces == [("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "Translate to French.\n\n### Input:\nGood morning\n\n### Response:\n", False),
                      ("Bonjour", True)]
    assert render(ALPACA[2], TEMPLATES["plain"]) == [("Name a primary colour.\n\n", False), ("Red.", True)]
    assert render({**ALPACA[2], "input": None}, TEMPLATES["plain"]) == render(ALPACA[2], TEMPLATES["plain"])
    ids, mask = tokenize(render(ALPACA[2], TEMPLATES["plain"]), Gpt2Tokenizer())
    assert ids[-1] == GPT2_EOT and mask == [0] * (len(ids) - 3) + [1, 1, 1]  # "Red", ".", <|endoftext|>


@pytest.mark.parametrize("records, message", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "index 1: missing field 'output'"),
    ('{"instruction": "a", "output": "b"}\n{"output": 3, "instruction": "x"}\n', "line 2: field 'output' is int"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b"\n', "line 3: not valid JSON"),
    ('[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}]',
     "index 0: missing field 'messages[1].content'"),
    ('[{"messages": [{"role": "user", "content": "hi"}]}]', "index 0: the last message must be the assistant's"),
    ('[{"prompt": "a", "completion": "b"}]', "index 0: missing field 'instruction'"),
])
def test_malformed_records_name_file_place_and_field(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(records)
    with pytest.raises(UserError, match=re.escape(f"{path} {message}")):
        prepare_instructions(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


SHAREGPT = {"conversations": [{"from": "system", "value": "You are terse."},
                               {"from": "human", "value": "Capital of France?"},
                               {"from": "gpt", "value": "Paris."},
                               {"from": "human", "value": "And of Italy?"},
                               {"from": "gpt", "value": "Rome."}]}
DOLLY = {"instruction": "Translate to French.", "context": "Good morning", "response": "Bonjour",
         "category": "open_qa"}


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_sharegpt_dolly_and_mapped_records_render_as_their_chat_and_alpaca_twins(template):
    """ShareGPT is chat with other names (from/value, human/gpt), Dolly is Alpaca with context as the input, and
    a column map reads any field names: each renders exactly as the record it stands for."""
    t = TEMPLATES[template]
    assert render(SHAREGPT, t) == render(CHAT, t)
    assert render(DOLLY, t) == render(ALPACA[1], t)
    assert render({"instruction": "Name a primary colour.", "response": "Red."}, t) == render(ALPACA[2], t)
    columns = parse_columns('{"instruction": "question", "input": "extra", "output": "answer"}')
    mapped = {"question": "Translate to French.", "extra": "Good morning", "answer": "Bonjour", "output": "ignored"}
    assert render(mapped, t, columns) == render(ALPACA[1], t)
    assert render({**mapped, "extra": None}, t, columns) == render({**ALPACA[1], "input": ""}, t)
    dialog = {"dialog": CHAT["messages"]}
    assert render(dialog, t, parse_columns('{"messages": "dialog"}')) == render(CHAT, t)


@pytest.mark.parametrize("records, message", [
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]',
     "index 0: field 'conversations[1].from' is 'bot', not system, human or gpt"),
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "yo"}]}]',
     "index 0: conversations[1] is a human message where a gpt message belongs (an optional system message "
     "first, then human and gpt alternating)"),
    ('[{"conversations": [{"from": "human", "value": "hi"}]}]', "index 0: the last message must be the gpt's"),
    ('[{"conversations": []}]', "index 0: field 'conversations' must be a non-empty list"),
    ('{"instruction": "a", "context": "b"}\n', "line 1: missing field 'response'"),
    ('{"instruction": "a", "context": "b", "response": ["c"]}\n', "line 1: field 'response' is list, not a string"),
])
def test_malformed_sharegpt_and_dolly_records_name_file_place_and_field(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(records)
    with pytest.raises(UserError, match=re.escape(f"{path} {message}")):
        prepare_instructions(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("records, columns, message", [
    # a map naming a field the file does not have: a mistake in the map, whatever --skip_invalid says
    ('{"question": "a", "answer": "b"}\n', '{"instruction": "quest", "output": "answer"}',
     "--columns maps 'instruction' to 'quest', but {path} line 1 has no field 'quest' (its fields: answer, "
     "question); fix --columns"),
    # the first record has it, a later one not: that record is invalid
    ('{"q": "a", "a": "b"}\n{"q": "c"}\n', '{"instruction": "q", "output": "a"}', "{path} line 2: missing field 'a'"),
    ('[{"q": "a", "a": "b", "x": "c"}, {"q": "a", "a": "b"}]', '{"instruction": "q", "output": "a", "input": "x"}',
     "{path} index 1: missing field 'x' (mapped from 'input' by --columns)"),
    ('[{"d": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, {"e": 1}]',
     '{"messages": "d"}', "{path} index 1: missing field 'd' (mapped from 'messages' by --columns)"),
])
def test_column_map_naming_missing_fields(tmp_path, records, columns, message):
    path = tmp_path / "mapped.json"
    path.write_text(records)
    with pytest.raises(UserError, match=re.escape(message.format(path=path))):
        prepare_instructions(str(path), tmp_path / "out", columns=parse_columns(columns), skip_invalid=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("{instr", "--columns={instr is not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('["a"]', "--columns=[\"a\"] must be a non-empty JSON object"),
    ("{}", "--columns={} must be a non-empty JSON object"),
    ('{"prompt": "q"}', "--columns names 'prompt', which is not one of our fields; map instruction, input, output, "
                        "messages, conversations to your field names"),
    ('{"output": ""}', "--columns maps 'output' to ''; the value must be the name of a field"),
    ('{"messages": "d", "output": "a"}', "--columns maps 'messages' together with 'output'"),
])
def test_bad_column_map_is_one_line(text, message):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        parse_columns(text)
    assert "\n" not in str(info.value) and "e.g. --columns='{\"instruction\": \"question\"" in str(info.value)


def test_formats_and_bad_input_through_the_command(tmp_path):
    """data/prepare.py reads all four kinds in one file and counts them; an empty file, a file of no
    instruction records (all invalid, --skip_invalid) and a column map naming a missing field are one line,
    exit 2, nothing written."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ALPACA[0], DOLLY, CHAT, SHAREGPT, SHAREGPT]) + "\n")
    base = [f"--data_dir={tmp_path}", "--format=instructions", "--block_size=128", "--val_fraction=0.2"]
    proc = run_cmd(python(REPO / "data/prepare.py", f"--input={path}", "--name=mixed", *base), cwd=tmp_path)
    assert "read 5 examples from 1 file(s) (1 alpaca, 1 dolly, 1 chat, 2 sharegpt), template alpaca" in proc.stdout
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "text.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "qa.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    cases = [([f"--input={tmp_path / 'empty.json'}"], f"error: {tmp_path / 'empty.json'} holds no instruction records"),
             ([f"--input={tmp_path / 'text.jsonl'}", "--skip_invalid"],
              f"error: no instruction record in {tmp_path / 'text.jsonl'}: all 2 record(s) are invalid (the first: "),
             ([f"--input={tmp_path / 'qa.jsonl'}", '--columns={"instruction": "q", "output": "answer"}'],
              "error: --columns maps 'instruction' to 'q', but"),
             ([f"--input={tmp_path / 'qa.jsonl'}", '--columns={"instruction": "question"', "--skip_invalid"],
              "error: --columns={\"instruction\": \"question\" is not valid JSON")]
    for args, start in cases:
        proc = run_cmd(python(REPO / "data/prepare.py", "--name=bad", *base, *args), cwd=tmp_path, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), proc.stderr
        assert not (tmp_path / "bad").exists()


def test_broken_json_list_is_a_file_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]')
    with pytest.raises(UserError, match=re.escape(f"{path} is not valid JSON (line 2 column 33: Expecting value); "
                                                     f"fix it, or write one JSON record per line (JSONL)")):
        prepare_instructions(str(path), tmp_path / "out")


def test_malformed_record_cli_error_and_skip_invalid(tmp_path):
    path = tmp_path / "data.jsonl"
    good = [json.dumps(r) for r in ALPACA]
    path.write_text("\n".join(good[:2] + ['{"instruction": "no output"}'] + good[2:] + ["[1, 2]"]) + "\n")
    args = python(REPO / "data/prepare.py", f"--input={path}", "--name=x", "--format=instructions",
                  f"--data_dir={tmp_path}")
    proc = run_cmd(args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip() == (f"error: {path} line 3: missing field 'output'; fix the record or pass "
                                   f"--skip_invalid to drop such records")
    proc = run_cmd(args + ["--skip_invalid"], cwd=tmp_path)
    assert (f"skipped 2 invalid record(s) (--skip_invalid); the first: {path} line 3: missing field 'output'"
            in proc.stdout)
    assert "read 4 examples" in proc.stdout and (tmp_path / "x" / "train_mask.bin").is_file()


def test_overlong_examples_truncated_or_dropped(tmp_path):
    long = {"instruction": "Repeat.", "output": " word" * 200}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA + [long]))
    prepare_instructions(str(path), tmp_path / "t", block_size=64, val_fraction=0.2)
    _, tokens, mask, pos = load_split(tmp_path / "t", "train")
    assert max(len(ids) for ids, _ in examples_of(tokens, mask, pos)) <= 65
    meta = prepare_instructions(str(path), tmp_path / "d", block_size=64, overlong="drop", val_fraction=0.2)
    assert sum(meta["examples"].values()) == len(ALPACA)
    with pytest.raises(UserError, match="needs --tokenizer=gpt2"):
        prepare_instructions(str(path), tmp_path / "c", tokenizer="char")


def test_packing_never_splits_an_example_and_fills_blocks():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(2000)] + [129]
    blocks = pack(lengths, 129)
    assert sorted(i for b in blocks for i in b) == list(range(len(lengths)))  # each example once, whole
    assert all(sum(lengths[i] for i in b) <= 129 for b in blocks)
    assert sum(lengths) / (129 * len(blocks)) > 0.97  # best-fit decreasing leaves little padding


def test_loader_gives_whole_blocks_positions_and_epoch_order(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA * 5))
    prepare_instructions(str(path), tmp_path / "p", block_size=64, template_name="plain", val_fraction=0.2)
    data = TokenData(tmp_path / "p", 64)
    n = data.n_windows("train")
    x, y, pos = data.windows("train", np.arange(n))
    _, tokens, mask, positions = load_split(tmp_path / "p", "train")
    assert torch.equal(x.flatten(), torch.from_numpy(tokens.reshape(n, 65)[:, :64]).flatten())
    assert torch.equal(pos.flatten(), torch.from_numpy(positions.reshape(n, 65)[:, :64]).flatten())
    assert torch.equal(y == IGNORE_INDEX, torch.from_numpy(mask.reshape(n, 65)[:, 1:] == 0))
    drawn = [0]
    stream = np.concatenate([data.draw(None, 3, drawn, 1337) for _ in range(2 * n // 3)])
    assert sorted(stream[:n]) == list(range(n)) and drawn == [len(stream)]  # every block once per epoch
    with pytest.raises(Exception, match="packed for block_size=64, not 128; train with --block_size=64"):
        TokenData(tmp_path / "p", 128)
    mask = tmp_path / "p" / "val_mask.bin"
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(Exception, match="val_mask.bin has 64 entries for 65 tokens .*; prepare the dataset again"):
        TokenData(tmp_path / "p", 64)


# ---------------------------------------------------------------- sealed packing, exact masking

@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128))
    lm.config._attn_implementation = "sdpa"
    return lm.eval()


def packed_block(examples, capacity=129):
    tokens, mask, pos = layout(examples, capacity, GPT2_EOT)
    T = capacity - 1
    x = torch.from_numpy(tokens[:T])[None]
    y = torch.from_numpy(tokens[1:]).clone()[None]
    y[0, torch.from_numpy(mask[1:] == 0)] = IGNORE_INDEX
    return x, y, torch.from_numpy(pos[:T].astype(np.int64))[None]


def test_packing_is_sealed(tiny_lm):
    tok = Gpt2Tokenizer()
    a1 = tokenize(render(ALPACA[0], TEMPLATES["alpaca"]), tok)
    a2 = tokenize(render(ALPACA[1], TEMPLATES["alpaca"]), tok)  # another example, another length
    b = tokenize(render(ALPACA[3], TEMPLATES["alpaca"]), tok)

    def logits_of_b(first):
        x, _, pos = packed_block([first, b])  # layout keeps the order: first, then b
        logits = tiny_lm(input_ids=x, position_ids=pos, attention_mask=packed_causal_mask(pos)).logits
        start = len(first[0])
        assert pos[0, start] == 0 and pos[0, start - 1] > 0
        return logits[0, start:start + len(b[0])]

    with torch.no_grad():
        alone = tiny_lm(input_ids=torch.tensor([b[0]])).logits[0]
        after_a1, after_a2 = logits_of_b(a1), logits_of_b(a2)
    assert len(a1[0]) != len(a2[0])
    assert torch.allclose(after_a1, after_a2, atol=1e-5) and torch.allclose(after_a1, alone, atol=1e-5)
    # without the block-diagonal mask b would see a1: the check above is not vacuous
    x, _, pos = packed_block([a1, b])
    with torch.no_grad():
        leaky = tiny_lm(input_ids=x, position_ids=pos).logits[0, len(a1[0]):len(a1[0]) + len(b[0])]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_packing_is_sealed_in_the_training_loss_with_lora(tiny_lm):
    """Through LMWithLoss (the module DeepSpeed trains) with peft LoRA adapters on the projections."""
    import copy

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(tiny_lm), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False))  # random adapters, so they change the outputs
    model = LMWithLoss(lora).eval()
    tok = Gpt2Tokenizer()
    a1, a2, b = (tokenize(render(r, TEMPLATES["alpaca"]), tok) for r in (ALPACA[0], ALPACA[1], ALPACA[3]))

    def loss_on_b(examples):
        x, y, pos = packed_block(examples)
        y[0, :sum(len(ids) for ids, _ in examples[:-1])] = IGNORE_INDEX  # only b's targets count
        return model(x, y, pos)

    with torch.no_grad():
        alone, after_a1, after_a2 = loss_on_b([b]), loss_on_b([a1, b]), loss_on_b([a2, b])
        assert not torch.allclose(alone, LMWithLoss(tiny_lm)(*packed_block([b])), atol=1e-4)  # adapters act
    assert torch.allclose(after_a1, alone, atol=1e-5) and torch.allclose(after_a2, alone, atol=1e-5)


def test_masking_is_exact(tiny_lm):
    tok = Gpt2Tokenizer()
    examples = [tokenize(render(r, TEMPLATES["alpaca"]), tok) for r in ALPACA[:3]]
    x, y, pos = packed_block(examples, capacity=257)
    model = LMWithLoss(tiny_lm)
    with torch.no_grad():
        loss = model(x, y, pos)
        # independent: full logits with the same attention, cross-entropy on the response tokens only
        logits = tiny_lm(input_ids=x, position_ids=pos, attention_mask=packed_causal_mask(pos)).logits[0]
        keep = y[0] != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[keep], y[0][keep])
        assert torch.allclose(loss, manual, atol=1e-5)
        n_response = sum(sum(m) for _, m in examples)
        assert int(keep.sum()) == n_response  # every response token and each <|endoftext|>, nothing else

        # a response token changes: the loss changes (mask-0 targets: test_loader_masks_prompt_targets_...)
        response = y.clone()
        first = int(torch.nonzero(keep)[0])
        response[0, first] = (response[0, first] + 1) % 50257
        assert not torch.allclose(model(x, response, pos), loss)


def test_loader_masks_prompt_targets_whatever_they_hold(tmp_path, tiny_lm):
    """Changing the tokens under mask 0, as targets, changes neither the targets nor the loss."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA))
    prepare_instructions(str(path), tmp_path / "a", block_size=256, val_fraction=0.25)
    data = TokenData(tmp_path / "a", 256)
    x, y, pos = data.windows("train", [0])
    tokens = np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16)
    mask = np.fromfile(tmp_path / "a" / "train_mask.bin", dtype=np.uint8)
    prompt = np.nonzero(mask[1:257] == 0)[0] + 1  # targets under mask 0
    tokens[prompt] = (tokens[prompt] + 7) % 50257
    tokens.tofile(tmp_path / "a" / "train.bin")
    _, y2, _ = TokenData(tmp_path / "a", 256).windows("train", [0])
    assert torch.equal(y, y2) and (y[0, prompt - 1] == IGNORE_INDEX).all()
    model = LMWithLoss(tiny_lm)
    with torch.no_grad():
        assert torch.equal(model(x, y, pos), model(x, y2, pos))


# ---------------------------------------------------------------- a tiny GPT-2 learns a task

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "water",
         "horse", "paper", "bread", "chair", "light", "north", "happy", "silver"]  # one BPE token each


def reverse_task():
    combos = [(a, b, c) for a in WORDS for b in WORDS for c in WORDS]
    random.Random(0).shuffle(combos)
    held_out, train = combos[:64], combos[64:1864]
    # the answer starts with a space, so each word is the same token in the prompt and in the answer
    record = lambda ws: {"instruction": "reverse " + " ".join(ws), "output": " " + " ".join(reversed(ws))}  # noqa: E731
    return [record(ws) for ws in train], [record(ws) for ws in held_out]


def exact_match(lm, records):
    """Greedy answers to the held-out prompts (all the same length: one batch) that match exactly, then EOT."""
    tok = Gpt2Tokenizer()
    prompts = torch.tensor([tok.encode_ordinary(TEMPLATES["plain"].prompt(r["instruction"])) for r in records])
    want = [tok.encode_ordinary(r["output"]) + [GPT2_EOT] for r in records]
    idx = prompts
    with torch.no_grad():
        for _ in range(max(map(len, want))):
            idx = torch.cat([idx, lm(input_ids=idx).logits[:, -1, :50257].argmax(-1, keepdim=True)], dim=1)
    return sum(idx[i, prompts.size(1):prompts.size(1) + len(w)].tolist() == w for i, w in enumerate(want))


@pytest.mark.slow
def test_tiny_gpt2_learns_reversing_words(tmp_path):
    """Reverse three words: about 0/64 held-out prompts right at the start, at least 48/64 after training.

    Measured: 0/64 before; 64/64 after 58 iterations (2 epochs of 229 blocks, 8 blocks per iteration), val loss
    10.8 -> about 0.1; about 50 s on 2 busy CPU cores, and about 10 s more for eval_generate=16 and the
    eval.py --generate launch on the held-out records (64/64 there too).
    """
    from trainer.tools.loading import load_for_inference
    train, held_out = reverse_task()
    (tmp_path / "rev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    run_cmd(python(REPO / "data/prepare.py", f"--input={tmp_path / 'rev.jsonl'}", "--name=rev", "--format=instructions",
                   "--template=plain", "--block_size=64", f"--data_dir={tmp_path}"), cwd=tmp_path)
    base = tmp_path / "tiny"
    start = make_tiny_gpt2(base, n_layer=2, n_head=4, n_embd=128, n_positions=64)
    before = exact_match(start.eval(), held_out)

    blocks = (tmp_path / "rev" / "train.bin").stat().st_size // 2 // 65
    proc = run_cmd(python(REPO / "launch/train.py", f"--init_from={base}", "--dataset=rev", f"--data_dir={tmp_path}",
                          f"--out_dir={tmp_path / 'out'}", "--block_size=64", "--batch_size=8",
                          "--gradient_accumulation_steps=1", "--max_epochs=2", "--learning_rate=3e-3",
                          "--warmup_iters=10", "--min_lr=3e-4", "--weight_decay=0.0", "--eval_interval=1000",
                          "--eval_iters=4", "--log_interval=50", "--mode=full", "--sample_max_new_tokens=0",
                          "--eval_generate=16"), cwd=tmp_path)
    iters = -(-2 * blocks // 8)  # ceil(2 epochs * blocks / 8 blocks per iteration)
    assert f"-> max_iters={iters} " in proc.stdout
    losses = [float(v) for v in re.findall(r"val loss ([\d.]+)", proc.stdout)]
    assert losses[0] > 9 and losses[-1] < 0.5, losses

    after = exact_match(load_for_inference(str(tmp_path / "out")).lm, held_out)
    print(f"exact match on {len(held_out)} held-out prompts: {before} before, {after} after {iters} iterations")
    assert before <= 2 and after >= 48, (before, after)

    # eval_generate=16: 16 fixed val answers scored at each evaluation (the first and the last)
    scores = {tag: tb_scalars(tmp_path / "out", f"eval/{tag}") for tag in ("exact_match", "rougeL", "bleu")}
    assert scores["exact_match"][0] == 0 and scores["exact_match"][iters] >= 0.75, scores
    assert scores["rougeL"][iters] >= 0.75 and scores["bleu"][iters] >= 75, scores  # effective order: 3 words score
    assert re.search(rf"^step {iters}: 16 val answers: exact match [\d.]+, ROUGE-L [\d.]+, BLEU [\d.]+$", proc.stdout,
                     re.M)

    # eval.py --generate on the held-out records: the exact match counted above, and every answer in the JSONL
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    report = json.loads(run_cmd(python(REPO / "launch/eval.py", f"--out_dir={tmp_path / 'out'}", "--generate",
                                       f"--records={tmp_path / 'held_out.jsonl'}", "--json"),
                                cwd=tmp_path).stdout.strip().splitlines()[-1])
    (result,) = report["results"]
    assert result["answers"] == 64 and result["exact_match"] == pytest.approx(after / 64, abs=1 / 64), (result, after)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["output"] for r in held_out]
    assert sum(r["exact_match"] for r in rows) == round(64 * result["exact_match"])

    # sample.py wraps the instruction in the template and stops at end-of-text
    record = held_out[0]
    proc = run_cmd(python(REPO / "launch/sample.py", f"--out_dir={tmp_path / 'out'}", "--prompt_template=plain",
                          f"--start={record['instruction']}", "--num_samples=1", "--temperature=0",
                          "--max_new_tokens=20"), cwd=tmp_path)
    answer = proc.stdout.split("---------------")[0].strip().splitlines()[-1]  # after any library warnings
    assert answer.strip() == record["output"].strip()


def test_text_prepared_over_an_instruction_dataset_drops_its_masks(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA))
    prepare_instructions(str(path), tmp_path / "same", block_size=64, val_fraction=0.25)
    (tmp_path / "t.txt").write_text("Plain text for the same name. " * 200)
    run_cmd(python(REPO / "data/prepare.py", f"--input={tmp_path / 't.txt'}", "--name=same",
                   f"--data_dir={tmp_path}"), cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["meta.pkl", "train.bin", "val.bin"]
    data = TokenData(tmp_path / "same", 64)
    assert not data.packed and data.masks == {"train": None, "val": None}


def test_streamed_prepare_equals_packing_in_memory(tmp_path):
    # More records than one task holds, over 2 worker processes: the output is exactly what
    # rendering, splitting and packing every example in memory gives (layout/pack above).
    rng = random.Random(0)
    records = [dict(r, output=r["output"] * rng.randint(1, 40)) for r in ALPACA * 700] + [CHAT] * 300
    rng.shuffle(records)
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(records) > instructions.RECORDS_PER_TASK
    meta = prepare_instructions(str(path), tmp_path / "s", block_size=128, val_fraction=0.1, num_proc=2)

    tok, template = Gpt2Tokenizer(), TEMPLATES["alpaca"]
    examples = [tokenize(render(r, template), tok) for r in records]
    examples = [(ids[:129], mask[:129]) for ids, mask in examples]
    train, val = ([examples[i] for i in part] for part in split_indices(len(examples), 0.1, 1337))
    for split, exs in (("train", train), ("val", val)):
        tokens, mask, pos = layout(exs, 129, GPT2_EOT)
        _, got_tokens, got_mask, got_pos = load_split(tmp_path / "s", split)
        assert np.array_equal(got_tokens, tokens) and np.array_equal(got_mask, mask) and np.array_equal(got_pos, pos)
    assert meta["examples"] == {"train": len(train), "val": len(val)}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        ["meta.pkl"] + [f"{s}{k}.bin" for s in ("train", "val") for k in ("", "_mask", "_pos")])


def test_bad_record_in_a_worker_keeps_the_previous_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    prepare_instructions(str(path), tmp_path / "k", block_size=64, val_fraction=0.25)
    before = {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()}
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA * 600) + '{"instruction": "x"}\n')
    with pytest.raises(UserError, match=re.escape(f"{path} line 2401: missing field 'output'")):
        prepare_instructions(str(path), tmp_path / "k", block_size=64, num_proc=2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()} == before


# ---------------------------------------------------------------- NEFTune

def neftune_noise(module, x, y, pos=None):
    """The noise NEFTune added to the input embeddings in one forward of `module` (in its current mode):
    the embedding's output as the model received it minus the embedding of the same tokens."""
    embedding = module.lm.get_input_embeddings()
    seen = []
    hook = embedding.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))  # after NEFTune's
    with torch.no_grad():
        module(x, y, pos) if pos is not None else module(x, y)
        clean = embedding.weight[x]
    hook.remove()
    return (seen[0] - clean)[0]


def test_neftune_noise_is_scaled_per_packed_example(tiny_lm):
    """Uniform noise in [-scale, scale], scale = alpha / sqrt(L * d) with L each example's own length inside
    the packed block (not the block's), measured on each example's noise: its largest value reaches the
    scale and its standard deviation is scale / sqrt(3), as a uniform distribution's."""
    import copy

    from trainer.model.neftune import add_neftune
    alpha, d = 5.0, tiny_lm.config.n_embd
    rng = np.random.default_rng(0)
    lengths = [9, 30, 80]  # + 9 tokens of padding, its own example, in the 128 tokens of x
    examples = [(rng.integers(0, 50000, n).tolist(), [0] * (n - 1) + [1]) for n in lengths]
    x, y, pos = packed_block(examples)
    module = add_neftune(LMWithLoss(copy.deepcopy(tiny_lm)), alpha).train()
    noise = neftune_noise(module, x, y, pos)
    starts = [0, *np.cumsum(lengths)]
    for (a, b), n in zip(zip(starts, starts[1:]), lengths):
        part, scale = noise[a:b], alpha / math.sqrt(n * d)
        assert 0.95 * scale < part.abs().max() <= scale * (1 + 1e-6), (n, float(part.abs().max()), scale)
        assert abs(float(part.std()) / (scale / math.sqrt(3)) - 1) < 0.12, n
        assert abs(float(part.mean())) < 0.1 * scale
    padding = noise[starts[-1]:]
    assert padding.abs().max() <= alpha / math.sqrt(len(padding) * d) * (1 + 1e-6)
    # a row without positions (text) is one example of the row's length
    row = neftune_noise(module, x, y)
    assert 0.95 < float(row.abs().max()) / (alpha / math.sqrt(x.size(1) * d)) <= 1 + 1e-6
    # training draws new noise every forward; evaluation sees none, and its loss is the plain model's
    assert not torch.equal(noise, neftune_noise(module, x, y, pos))
    module.eval()
    assert torch.equal(neftune_noise(module, x, y, pos), torch.zeros_like(noise))
    with torch.no_grad():
        assert torch.equal(module(x, y, pos), LMWithLoss(tiny_lm)(x, y, pos))


def test_neftune_off_leaves_no_trace(tiny_lm):
    """neftune_alpha=0 (the default): the builder registers no hook; > 0: one on the loss wrapper, one on the
    input embedding (with LoRA adapters: the embedding inside peft's model)."""
    import copy
    from types import SimpleNamespace

    from trainer.config import Config
    from trainer.model.builder import build_module
    plan = SimpleNamespace(mode="full", gradient_checkpointing=False, activation_offload=False)
    off = build_module(Config(), plan, copy.deepcopy(tiny_lm), "dense_mask")
    assert not off._forward_pre_hooks and not off.lm.get_input_embeddings()._forward_hooks
    lora = SimpleNamespace(mode="lora", gradient_checkpointing=False, activation_offload=False)
    on = build_module(Config(neftune_alpha=5.0), lora, copy.deepcopy(tiny_lm), "dense_mask").train()
    assert len(on._forward_pre_hooks) == 1 and len(on.lm.get_input_embeddings()._forward_hooks) == 1
    x, y, pos = packed_block([(list(range(100, 160)), [0] * 30 + [1] * 30)])
    assert 0 < float(neftune_noise(on, x, y, pos)[:60].abs().max()) <= 5.0 / math.sqrt(60 * 32) * (1 + 1e-6)
