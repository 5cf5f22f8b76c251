"""Loss and perplexity, or answers scored: `python launch/eval.py --out_dir=out-lora [--dataset=NAME | --text=FILE]
[--compare_base]`, and `python launch/eval.py --out_dir=out-lora --generate [--dataset=NAME | --records=FILE]`.

--out_dir is a training run (its latest checkpoint; LoRA runs too), an exported Hugging Face directory,
a GPT-2 hub name or a nanoGPT out_dir (its ckpt.pt). Without --dataset/--text a run is evaluated on its own
dataset(s) (a nanoGPT out_dir on the dataset its config names). A dataset is evaluated on its whole val
split (instruction data with the training masking: response tokens only, each packed example on its own);
a text file is tokenized with the model's tokenizer. Perplexity is
exp of the mean token loss. --compare_base evaluates the model the run started from (its init_from,
or --base) on the same tokens and prints the change: what the finetune cost on general text.

--generate answers instructions instead and scores the answers against the references (trainer/metrics.py:
exact match, ROUGE-L, BLEU): every example of an instruction dataset's val split (its prompt as trained on,
its response the reference), or the records of a JSON/JSONL file (--records, any format data/prepare.py
reads, rendered with the run's template or --template). Decoding is batched on the KV cache, greedy unless
--temperature > 0; every answer with its reference goes to a JSONL file (--predictions).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed

from trainer.cli import FlagParser, at_least, run_main  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.launcher import read_checkpoints_on_cpu  # noqa: E402


def parse_args(argv):
    p = FlagParser(__doc__)
    p.add_argument("--out_dir", required=True, help="a training run, an exported HF directory, or a GPT-2 hub name")
    p.add_argument("--dataset", default=None, help="a prepared dataset under --data_dir (default: the run's)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on instead of a dataset")
    p.add_argument("--data_dir", default=None, help="datasets folder (default: the run's data_dir, else data)")
    p.add_argument("--compare_base", action="store_true", help="also evaluate the starting model and print the change")
    p.add_argument("--base", default=None, help="the starting model for --compare_base (default: the run's init_from)")
    p.add_flag("--block_size", type=int, default=0, rule=at_least(0), help="context per window (default: the model's)")
    p.add_flag("--batch_size", type=int, default=8, rule=at_least(1))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    g = p.add_argument_group("answers (--generate)")
    g.add_argument("--generate", action="store_true", help="answer the instructions and score the answers")
    g.add_argument("--records", default=None, help="a JSON/JSONL file of instruction records to answer instead of a "
                   "dataset's val split")
    g.add_argument("--template", default=None, help="the prompt template of --records (default: the run's)")
    g.add_argument("--skip_invalid", action="store_true", help="leave out records that cannot be used")
    g.add_argument("--predictions", default=None, help="the JSONL file of answers and references (default: "
                   "OUT_DIR/predictions.jsonl for a local model folder, else ./predictions.jsonl)")
    p.add_flag("--max_new_tokens", type=int, default=0, rule=at_least(0),
               help="tokens an answer may take (0: twice the longest reference + 16), within the model's positions")
    p.add_flag("--limit", type=int, default=0, rule=at_least(0), help="answer only the first N examples (0: all)")
    p.add_flag("--temperature", type=float, default=0.0, rule=at_least(0.0), help="0: greedy; more: sampled")
    p.add_flag("--top_k", type=int, default=200, rule=at_least(1), help="sampling keeps the top_k tokens")
    p.add_flag("--seed", type=int, default=1337, rule=at_least(0), help="seed of sampled answers")
    args = p.parse(argv)
    if not args.generate:
        for flag in ("records", "template", "predictions"):
            if getattr(args, flag):
                raise UserError(f"--{flag} is for answering instructions; add --generate")
    elif args.text:
        raise UserError("--generate answers instructions, not a text file; give --records=FILE (instruction "
                        "records) or an instruction --dataset")
    elif args.records and args.dataset:
        raise UserError("give --dataset or --records, not both")
    return args


def load_model(source):
    from trainer.tools.loading import load_for_inference
    return load_for_inference(source)


def read_text(path):
    from trainer.prepare.utf8 import read_utf8
    if not Path(path).is_file():
        raise UserError(f"--text={path}: no such file")
    return read_utf8(Path(path))


def text_tokens(path, text, tokenizer):
    tokens = tokenizer.encode_ordinary(text)
    if len(tokens) < 2:
        raise UserError(f"--text={path} has {len(tokens)} token(s); give at least two")
    return tokens


def open_dataset(directory, tokenizer, block_size):
    """TokenData for evaluation: a packed dataset at its own block size, a text one at `block_size`."""
    from trainer.data.tokenizer import tokenizer_kind
    from trainer.data.tokens import TokenData, read_meta
    if not Path(directory).is_dir():
        raise UserError(f"dataset folder {directory} does not exist; prepare it or pass --data_dir/--dataset")
    meta = read_meta(directory)
    kind = tokenizer_kind(meta)
    if kind != tokenizer.name or (kind == "char" and meta["stoi"] != tokenizer.stoi):
        raise UserError(f"{directory} was prepared with the {kind} tokenizer, but the model uses "
                        f"{tokenizer.name}; evaluate on data prepared for this model, or use --text=FILE")
    if meta.get("format") == "instructions":
        if meta["block_size"] > block_size:
            raise UserError(f"{directory} is packed for block_size={meta['block_size']}, more than the model's "
                            f"{block_size}; prepare it again with --block_size={block_size}")
        block_size = meta["block_size"]
    return TokenData(directory, block_size)


def targets(args, loaded, block_size, text=None):
    """[(label, evaluate(lm, device) -> EvalResult)] for what this command asks for."""
    from trainer.tools.evaluate import evaluate_dataset, evaluate_stream
    if args.text and args.dataset:
        raise UserError("give --dataset or --text, not both")
    if args.text:
        tokens = text_tokens(args.text, text, loaded.tokenizer)
        return [(f"text {args.text}", lambda lm, dev: evaluate_stream(lm, tokens, block_size, args.batch_size, dev))]
    data_dir, names = datasets_of(args, loaded, "give --dataset=NAME or --text=FILE")
    out = []
    for name in names:
        data = open_dataset(data_dir / name, loaded.tokenizer, block_size)
        kind = "instruction blocks, response tokens" if data.packed else "all tokens"
        out.append((f"{name} val ({kind})", lambda lm, dev, d=data: evaluate_dataset(lm, d, args.batch_size, dev)))
    return out


def datasets_of(args, loaded, fix):
    """(data_dir, dataset names): --dataset, else the run's own (a mixture names several)."""
    run = loaded.run_config or {}
    names = [args.dataset] if args.dataset else run.get("dataset")
    if not names:
        raise UserError(f"{args.out_dir} is not a training run, so it has no dataset: {fix}")
    return Path(args.data_dir or run.get("data_dir") or "data"), [names] if isinstance(names, str) else names


def base_source(args, loaded):
    if args.base:
        return args.base
    init_from = (loaded.run_config or {}).get("init_from")
    if init_from is None:
        raise UserError(f"{args.out_dir} is not a training run, so its starting model is unknown: pass --base=MODEL")
    if init_from == "scratch":
        raise UserError(f"{args.out_dir} was trained from scratch: there is no base model to compare with "
                        f"(pass --base=MODEL to compare with another one)")
    return init_from


def load_base(args, loaded, why):
    """(--compare_base's model, where it came from); its tokenizer must be the model's, `why` says for what."""
    source = base_source(args, loaded)
    base = load_model(source)
    if base.tokenizer.name != loaded.tokenizer.name:
        raise UserError(f"the base {source} uses the {base.tokenizer.name} tokenizer, the model "
                        f"{loaded.tokenizer.name}: {why}")
    return base, source


def result_dict(r):
    return {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens}


def generation_targets(args, loaded):
    """[(label, [Example])] for --generate: a records file, or the val split of each instruction dataset."""
    from trainer.prepare.templates import get_template
    from trainer.tools.answers import dataset_examples, record_examples
    if args.records:
        name = args.template or loaded.template
        if name is None:
            raise UserError(f"{args.out_dir} is not a run trained on instruction data, so its prompt template is "
                            f"unknown: pass --template=alpaca or --template=plain (as the model was trained)")
        examples, skipped, first = record_examples(args.records, get_template(name), loaded.tokenizer,
                                                   args.skip_invalid)
        if skipped:
            print(f"skipped {skipped:,} invalid record(s) (--skip_invalid); the first: {first}", file=sys.stderr)
        return [(f"records {args.records}", examples)]
    data_dir, names = datasets_of(args, loaded, "give --dataset=NAME (instruction data) or --records=FILE (a "
                                                "JSON/JSONL file of instruction records)")
    out = []
    for name in names:
        data = open_dataset(data_dir / name, loaded.tokenizer, loaded.block_size)
        if data.packed:
            out.append((f"{name} val", dataset_examples(data, loaded.tokenizer, name)))
        elif len(names) > 1:
            print(f"notice: {name} is text, not instructions: left out of --generate", file=sys.stderr)
    if not out:
        raise UserError(f"--generate answers instructions, but {', '.join(names)} is text, not instruction data; "
                        f"give a file of instruction records with --records=FILE (JSON or JSONL, e.g. "
                        f"{{\"instruction\": ..., \"output\": ...}} per line)")
    return out


def default_predictions(out_dir):
    folder = Path(out_dir)
    return folder / "predictions.jsonl" if folder.is_dir() else Path("predictions.jsonl")


def main_generate(args, loaded, device):
    """--generate: answer, score, compare with the base, write every answer beside its reference."""
    from trainer.files import atomic_write
    from trainer.metrics import answer_metrics, exact_match, require_metric_packages
    from trainer.tools.answers import answer
    require_metric_packages()
    if loaded.tokenizer.eot_token is None:
        raise UserError("--generate needs a GPT-2 BPE model (answers end at <|endoftext|>); this one reads characters")
    targets = generation_targets(args, loaded)
    base, source = load_base(args, loaded, "it cannot answer the same prompts") if args.compare_base else (None, None)
    path = Path(args.predictions) if args.predictions else default_predictions(args.out_dir)

    def answers_of(model, examples, label):
        return answer(model.lm, examples, model.tokenizer, model.block_size, model.vocab_limit, args.max_new_tokens,
                      args.batch_size, args.temperature, args.top_k, args.seed, device, label)

    report, lines = {"model": args.out_dir, "predictions": str(path), "results": []}, []
    for label, examples in targets:
        examples = examples[:args.limit] if args.limit else examples
        references = [e.reference for e in examples]
        predictions = answers_of(loaded, examples, label)
        scores = answer_metrics(predictions, references)
        entry = {"data": label, "answers": len(examples), **scores}
        text = [f"{label}: exact match {scores['exact_match']:.4f}, ROUGE-L {scores['rougeL']:.4f}, "
                f"BLEU {scores['bleu']:.2f} ({len(examples):,} answers)"]
        rows = [{"data": label, "source": e.source, "prompt": loaded.tokenizer.decode(e.prompt), "reference": ref,
                 "prediction": pred, "exact_match": exact_match(pred, ref)}
                for e, ref, pred in zip(examples, references, predictions)]
        if base is not None:
            base_predictions = answers_of(base, examples, f"{label} (base)")
            before = answer_metrics(base_predictions, references)
            entry["base"] = {"model": source, **before}
            entry["change"] = {k: scores[k] - before[k] for k in scores}
            text.append(f"  base {source}: exact match {before['exact_match']:.4f}, ROUGE-L {before['rougeL']:.4f}, "
                        f"BLEU {before['bleu']:.2f}")
            text.append(f"  change: exact match {entry['change']['exact_match']:+.4f}, ROUGE-L "
                        f"{entry['change']['rougeL']:+.4f}, BLEU {entry['change']['bleu']:+.2f}")
            for row, pred in zip(rows, base_predictions):
                row["base_prediction"] = pred
        report["results"].append(entry)
        lines += rows
        if not args.json:
            print("\n".join(text), flush=True)
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in lines))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {len(lines):,} answers with their references to {path}")
    return 0


def main(argv):
    args = parse_args(argv)
    read_checkpoints_on_cpu()
    # the text file read before the 6-7 s of imports: an unreadable or non-UTF-8 file is one line at once
    text = read_text(args.text) if args.text else None
    if args.generate:
        from trainer.metrics import require_metric_packages
        require_metric_packages()  # before the model is loaded: a missing package is one line in a second
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    loaded = load_model(args.out_dir)
    if args.generate:
        return main_generate(args, loaded, device)
    block_size = args.block_size or loaded.block_size
    if not 1 <= block_size <= loaded.block_size:
        raise UserError(f"--block_size={block_size} must be between 1 and the model's {loaded.block_size}")
    jobs = targets(args, loaded, block_size, text)
    base = None
    if args.compare_base:
        base, source = load_base(args, loaded, "their losses are not comparable")
        if base.block_size < block_size:
            raise UserError(f"the base {source} has {base.block_size} positions, fewer than block_size="
                            f"{block_size}; pass --block_size={base.block_size}")

    report = {"model": args.out_dir, "block_size": block_size, "results": []}
    for label, run in jobs:
        result = run(loaded.lm, device)
        entry = {"data": label, **result_dict(result)}
        lines = [f"{label}: loss {result.loss:.6f}, perplexity {result.perplexity:.6g} ({result.tokens:,} tokens)"]
        if base is not None:
            before = run(base.lm, device)
            entry["base"] = {"model": source, **result_dict(before)}
            entry["change"] = {"loss": result.loss - before.loss,
                               "perplexity": result.perplexity - before.perplexity,
                               "perplexity_percent": 100 * (result.perplexity / before.perplexity - 1)}
            lines.append(f"  base {source}: loss {before.loss:.6f}, perplexity {before.perplexity:.6g}")
            lines.append(f"  change: loss {entry['change']['loss']:+.6f}, perplexity "
                         f"{entry['change']['perplexity']:+.6g} ({entry['change']['perplexity_percent']:+.1f}%)")
        report["results"].append(entry)
        if not args.json:
            print("\n".join(lines), flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    run_main(main)
