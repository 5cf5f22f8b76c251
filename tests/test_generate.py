"""Answers: batched KV-cache decoding against transformers' generate, the answer metrics, the examples of a
packed val split and of a records file, and eval.py --generate's one-line errors."""
import json

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import REPO, python, run_cmd, train_args
from trainer.data.tokenizer import GPT2_EOT, Gpt2Tokenizer
from trainer.data.tokens import TokenData
from trainer.errors import UserError
from trainer.metrics import answer_metrics
from trainer.model.generate import generate_answers, generate_batch
from trainer.model.sampling import generate
from trainer.prepare.instructions import prepare_instructions
from trainer.prepare.records import render, tokenize
from trainer.prepare.templates import TEMPLATES
from trainer.tools.answers import dataset_examples, record_examples

ALPACA = [{"instruction": "Name a primary colour.", "output": "Red."},
          {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
          {"instruction": "What is 2 + 2?", "input": "", "output": "4"}]
CHAT = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                     {"role": "assistant", "content": "Rome."}]}


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="sdpa").eval()


def prompts_of_many_lengths():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50000, (n,), generator=gen).tolist() for n in (7, 30, 3, 18, 11, 25)]


def test_batched_greedy_answers_equal_transformers_generate(lm):
    """Left-padded batches on the KV cache (longest first, batches of 4 of 6 prompts) give, token for token, what
    transformers' generate gives for the same batch, and what each prompt decoded alone gives."""
    prompts = prompts_of_many_lengths()
    ours = generate_answers(lm, prompts, 128, 12, GPT2_EOT, batch_size=4)
    width = max(map(len, prompts))
    ids = torch.tensor([[GPT2_EOT] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    theirs = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=GPT2_EOT, eos_token_id=GPT2_EOT)[:, width:].tolist()
    alone = [generate(lm, torch.tensor([p]), 12, 128, temperature=0)[0, len(p):].tolist() for p in prompts]
    assert ours == theirs == alone and all(len(a) == 12 for a in ours)


def test_rows_stop_at_end_of_text_and_sampling_follows_sample_py(lm):
    """A row is cut at its end-of-text (the others go on); one prompt sampled with a seeded generator draws the
    tokens launch/sample.py's generate draws (one rule: sampling.next_token)."""
    prompt = prompts_of_many_lengths()[1]
    free = generate_batch(lm, [prompt], 6, GPT2_EOT)[0]
    stop = free[2]  # make the third greedy token the stop token: the row ends before it
    assert generate_batch(lm, [prompt, prompts_of_many_lengths()[0]], 6, stop)[0] == free[:free.index(stop)]
    sampled = generate_batch(lm, [prompt], 10, GPT2_EOT, temperature=1.0, top_k=50,
                             generator=torch.Generator().manual_seed(3))[0]
    alone = generate(lm, torch.tensor([prompt]), 10, 128, temperature=1.0, top_k=50,
                     generator=torch.Generator().manual_seed(3))[0, len(prompt):].tolist()
    assert sampled == alone and sampled != free[:len(sampled)]


def test_answers_end_where_the_position_table_does(lm):
    """A prompt of 120 tokens in a 128-position model gets 9 tokens (the last at position 128 is never fed)."""
    long_prompt = torch.randint(0, 50000, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    answers = generate_answers(lm, [long_prompt, [5, 6]], 128, 50, GPT2_EOT, batch_size=2)
    assert [len(a) for a in answers] == [9, 9]
    assert len(generate_answers(lm, [list(range(200))], 128, 50, GPT2_EOT)[0]) == 1  # kept: its last 128 tokens


def test_answer_metrics_by_hand():
    """Exact match after trimming white space; ROUGE-L's F-measure of the longest common subsequence
    ('the cat sat' in 'the cat sat on': P = 1, R = 3/4, F = 6/7); BLEU on sacrebleu's 0-100 scale."""
    scores = answer_metrics(["  Paris ", "the cat sat", "no"], ["Paris", "the cat sat on", "yes"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["rougeL"] == pytest.approx((1 + 6 / 7 + 0) / 3)
    assert answer_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100)
    assert answer_metrics(["a b c d"], ["w x y z"]) == {"exact_match": 0.0, "rougeL": 0.0, "bleu": 0.0}


def test_exact_answers_score_full_marks_on_every_metric():
    """Short answers (one to three words: no 4-gram anywhere, where plain corpus BLEU is 0) that match their
    references score 100% on all three metrics: BLEU with sacrebleu's effective order."""
    import sacrebleu
    answers = ["Paris", "4", "yes it is", "blue whale"]
    assert sacrebleu.corpus_bleu(answers, [answers]).score == 0.0  # what the plain corpus BLEU says
    scores = answer_metrics(answers, list(answers))
    assert scores["exact_match"] == 1.0 and scores["rougeL"] == pytest.approx(1.0)
    assert scores["bleu"] == pytest.approx(100)
    wrong = answer_metrics(["Paris", "5", "no it is not", "a shark"], answers)  # and wrong answers are not 100
    assert 0 < wrong["bleu"] < 100 and wrong["exact_match"] == 0.25


def test_val_examples_and_records_ask_the_same_prompts(tmp_path):
    """A packed val split's examples are the records' prompts as trained (a chat's earlier turns included) and their
    last responses; reading the same records with --records renders the very same prompt tokens."""
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALPACA + [CHAT]))
    prepare_instructions(str(path), tmp_path / "d", block_size=128, val_fraction=0.5, template_name="alpaca")
    tok, template = Gpt2Tokenizer(), TEMPLATES["alpaca"]
    want = sorted((tokenize(render(r, template)[:-1], tok)[0], render(r, template)[-1][0]) for r in ALPACA + [CHAT])
    data = TokenData(tmp_path / "d", 128)
    from_data = dataset_examples(data, tok, "d", "train") + dataset_examples(data, tok, "d", "val")
    assert sorted((e.prompt, e.reference) for e in from_data) == want
    from_records, skipped, _ = record_examples(path, template, tok)
    assert sorted((e.prompt, e.reference) for e in from_records) == want and skipped == 0
    chat = [e for e in from_records if e.reference == "Rome."][0]
    assert tok.decode(chat.prompt).startswith("You are terse.\n\n") and "Paris.<|endoftext|>" in tok.decode(chat.prompt)


def test_records_without_instructions_are_one_line(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(UserError, match=f"{path} line 1: missing field 'instruction'"):
        record_examples(path, TEMPLATES["plain"], Gpt2Tokenizer())
    with pytest.raises(UserError, match=f"{path} holds no instruction records that could be used; give Alpaca"):
        record_examples(path, TEMPLATES["plain"], Gpt2Tokenizer(), skip_invalid=True)
    path.write_text("[]")
    with pytest.raises(UserError, match=f"{path} holds no instruction records; give Alpaca records"):
        record_examples(path, TEMPLATES["plain"], Gpt2Tokenizer())


def test_generate_on_text_data_says_how_to_give_records(data_dir, tiny_gpt2_dir, tmp_path):
    proc = run_cmd(python(REPO / "launch/eval.py", f"--out_dir={tiny_gpt2_dir}", "--generate", "--dataset=shakespeare",
                          f"--data_dir={data_dir}"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --generate answers instructions, but shakespeare is text, not instruction data; give a file of "
        'instruction records with --records=FILE (JSON or JSONL, e.g. {"instruction": ..., "output": ...} per line)')
    assert not (tmp_path / "predictions.jsonl").exists()


def test_missing_scorers_are_one_line_with_the_pip_command(tiny_gpt2_dir, tmp_path):
    shim = tmp_path / "not-installed"
    for module in ("rouge_score", "sacrebleu"):
        (shim / module).mkdir(parents=True)
        (shim / module / "__init__.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    proc = run_cmd(python(REPO / "launch/eval.py", f"--out_dir={tiny_gpt2_dir}", "--generate", "--records=x.jsonl"),
                   cwd=tmp_path, check=False, env={"PYTHONPATH": str(shim)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --generate scores answers with rouge-score and sacrebleu, which are not installed; "
        "pip install rouge-score==0.1.2 sacrebleu==2.6.0")


def test_eval_generate_on_text_data_is_one_line(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cmd(python(*train_args(data_dir, out, "--max_iters=2", "--eval_generate=4")), cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: eval_generate=4 answers the instructions of the val split, but dataset='shakespeare_char' is text; "
        "train on instruction data (data/prepare.py --format=instructions) or leave eval_generate=0")
    assert not out.exists()


def eval_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "launch/eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--records=r.jsonl"], "--records is for answering instructions; add --generate"),
    (["--template=plain"], "--template is for answering instructions; add --generate"),
    (["--generate", "--text=t.txt"], "--generate answers instructions, not a text file; give --records=FILE"),
    (["--generate", "--records=r.jsonl", "--dataset=d"], "give --dataset or --records, not both"),
    (["--generate", "--max_new_tokens=-1"], "--max_new_tokens=-1 must be 0 or more"),
])
def test_generate_flags_that_belong_together(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        eval_cli().parse_args(["--out_dir=x", *argv])


def test_records_on_a_model_without_a_template_asks_for_one(tmp_path):
    from types import SimpleNamespace
    cli = eval_cli()
    args = cli.parse_args(["--out_dir=export", "--generate", f"--records={tmp_path / 'r.jsonl'}"])
    loaded = SimpleNamespace(run_config=None, template=None, tokenizer=Gpt2Tokenizer())
    with pytest.raises(UserError, match=r"export is not a run trained on instruction data, so its prompt template is "
                                        r"unknown: pass --template=alpaca or --template=plain"):
        cli.generation_targets(args, loaded)
