"""Sample from a trained model: `python launch/sample.py --out_dir=out-shakespeare --start="To be"`.

Also `--init_from=gpt2-xl` (a hub name) or `--init_from=path/to/hf_dir`; `--out_dir` may be a nanoGPT out_dir
(its ckpt.pt; a character model's meta.pkl is found in its dataset's folder, docs/training.md).
Instruction-tuned models: `--prompt_template=alpaca --start="Give three tips for staying healthy."`, and an
Alpaca record's input beside its instruction: `--start="Translate to French." --input="Good morning"`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed

from trainer.cli import FlagParser, at_least, run_main  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.launcher import read_checkpoints_on_cpu  # noqa: E402


def parse_args(argv):
    p = FlagParser(__doc__)
    p.add_argument("--out_dir", default="out", help="training run to sample from (its latest/best checkpoint)")
    p.add_argument("--init_from", default="resume", help="'resume' (use --out_dir), a GPT-2 hub name or an HF directory")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_flag("--num_samples", type=int, default=10, rule=at_least(1))
    p.add_flag("--max_new_tokens", type=int, default=500, rule=at_least(1))
    p.add_flag("--temperature", type=float, default=0.8, rule=at_least(0.0),
               help="1.0 = as trained, lower = less random, 0 = greedy")
    p.add_flag("--top_k", type=int, default=200, rule=at_least(1), help="keep only the top_k most likely tokens")
    p.add_flag("--seed", type=int, default=1337, rule=at_least(0))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--prompt_template", default="", help="alpaca or plain: --start is an instruction, wrapped "
                   "in that template; sampling stops at end-of-text and prints the response only")
    p.add_argument("--input", default="", help="with --prompt_template: the Alpaca record's input (context for the "
                   "instruction), or FILE:path; rendered exactly as the training data renders it")
    args = p.parse(argv)
    if args.input and not args.prompt_template:
        raise UserError("--input is the input of an instruction; add --prompt_template=alpaca (or plain)")
    return args


def read_start(value, flag="--start"):
    """The text of --start or --input: as given, or FILE:path read from a file."""
    if value.startswith("FILE:"):
        from trainer.prepare.utf8 import read_utf8
        path = Path(value[5:])
        if not path.is_file():
            raise UserError(f"{flag}=FILE:{path}: no such file")
        return read_utf8(path)  # not UTF-8: one line naming the byte offset
    return value


def template_for(name, tokenizer):
    from trainer.prepare.templates import get_template
    template = get_template(name)
    if tokenizer.eot_token is None:
        raise UserError("--prompt_template needs a GPT-2 BPE model (instruction data ends with <|endoftext|>)")
    return template


def instruction_ids(tokenizer, template, instruction, input_text=""):
    """The prompt's token ids, rendered and tokenized as data/prepare.py does for a training record."""
    from trainer.prepare.templates import instruction_prompt
    return tokenizer.encode_ordinary(instruction_prompt(template, instruction, input_text))


def main(argv):
    args = parse_args(argv)
    read_checkpoints_on_cpu()
    # prompts read before the 6-7 s of imports: an unreadable or non-UTF-8 FILE: is one line at once
    start_text, input_text = read_start(args.start), read_start(args.input, "--input")
    import torch
    from trainer.model.sampling import generate
    from trainer.tools.loading import load_for_inference

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    source = args.out_dir if args.init_from == "resume" else args.init_from
    loaded = load_for_inference(source)
    lm = loaded.lm.to(device)
    if device == "cuda":
        lm = lm.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    template = None
    if args.prompt_template:  # an instruction: wrap it as in training, stop at end-of-text, print the response
        template = template_for(args.prompt_template, loaded.tokenizer)
        start = instruction_ids(loaded.tokenizer, template, start_text, input_text)
    else:
        start = loaded.tokenizer.encode(start_text)
    if not start:
        raise UserError("--start is empty after tokenization; give some text, e.g. --start='\\n'")
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([start], dtype=torch.long, device=device)
    for _ in range(args.num_samples):
        out = generate(lm, idx, args.max_new_tokens, loaded.block_size, temperature=args.temperature,
                       top_k=args.top_k, vocab_limit=loaded.vocab_limit, generator=gen,
                       stop_token=loaded.tokenizer.eot_token if template else None)
        if template:
            response = out[0, len(start):].tolist()
            print(loaded.tokenizer.decode(response[:-1] if response[-1:] == [loaded.tokenizer.eot_token] else response))
        else:
            print(loaded.tokenizer.decode(out[0].tolist()))
        print("---------------")
    return 0


if __name__ == "__main__":
    run_main(main)
