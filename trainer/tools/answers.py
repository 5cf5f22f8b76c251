"""Answering instructions and scoring the answers: what `launch/eval.py --generate` does.

The examples come from a packed instruction dataset's split (trainer/data/tokens.TokenData.examples: the
prompt tokens exactly as trained on, the reference the response without its end-of-text) or from a
JSON/JSONL file of instruction records in any format data/prepare.py reads, rendered with the run's
template as the preparation renders them (the prompt is everything before the record's last response,
the reference that response). The model answers them in batches on the KV cache
(trainer/model/generate.py); trainer/metrics.py scores the answers.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.errors import UserError
from trainer.model.generate import answer_budget, generate_answers
from trainer.prepare.records import InvalidRecord, read_records, render, tokenize


@dataclass
class Example:
    prompt: list[int]  # token ids, as the model is asked
    reference: str     # the answer it should give
    source: str        # where it comes from: 'alpaca val example 3', 'tasks.jsonl line 5'


def dataset_examples(data, tokenizer, name, split="val"):
    """The examples of a packed instruction dataset's split (trainer/data/tokens.TokenData)."""
    return [Example(prompt, tokenizer.decode(response), f"{name} {split} example {i}")
            for i, (prompt, response) in enumerate(data.examples(split))]


def record_examples(path, template, tokenizer, skip_invalid=False):
    """(examples, skipped records, the first skipped record's problem) of a JSON/JSONL file of records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--records={path}: no such file")
    examples, skipped, first_problem = [], 0, None
    for where, record in read_records(path):
        try:
            pieces = render(record, template)
        except InvalidRecord as exc:
            if not skip_invalid:
                raise UserError(f"{path} {where}: {exc}; fix the record or pass --skip_invalid to leave such "
                                f"records out") from None
            skipped += 1
            first_problem = first_problem or f"{path} {where}: {exc}"
            continue
        prompt, _ = tokenize(pieces[:-1], tokenizer)  # everything before the last response, as prepared
        examples.append(Example(prompt, pieces[-1][0], f"{path.name} {where}"))
    if not examples:
        raise UserError(f"{path} holds no instruction records{' that could be used' if skipped else ''}; give "
                        f"Alpaca records {{instruction, input, output}} or chat records {{messages}}, as a JSON list "
                        f"or one JSON object per line")
    return examples, skipped, first_problem


def answer(lm, examples, tokenizer, block_size, vocab_limit, max_new_tokens=0, batch_size=8, temperature=0.0,
           top_k=None, seed=1337, device="cpu", label="answers"):
    """The model's answer (text) to every example; a progress bar on a terminal (count, rate, ETA).

    max_new_tokens=0: model/generate.answer_budget of the references.
    """
    budget = max_new_tokens or answer_budget(len(tokenizer.encode_ordinary(e.reference)) for e in examples)
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = tqdm(total=len(examples), desc=label, unit="answer", file=sys.stderr, dynamic_ncols=True,
               disable=not sys.stderr.isatty())

    def progress(done, total):
        bar.update(done - bar.n)

    tokens = generate_answers(lm.to(device).eval(), [e.prompt for e in examples], block_size, budget,
                              tokenizer.eot_token, batch_size, temperature, top_k, vocab_limit, generator,
                              progress=progress)
    bar.close()
    return [tokenizer.decode(t) for t in tokens]
