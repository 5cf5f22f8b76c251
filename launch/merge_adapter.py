"""Export a training run as a Hugging Face model: `python launch/merge_adapter.py --out_dir=out-lora --export_dir=DIR`.

LoRA/QLoRA runs: the adapters are merged into the base weights (QLoRA: into the unquantized original
weights, or with --qlora_base=dequantized into the 4-bit weights it trained on, dequantized: the model as
trained); full runs: the checkpoint's weights (ZeRO shards consolidated); a nanoGPT out_dir (its ckpt.pt):
its model as GPT-2 with nanoGPT's exact GELU. The result is a directory
that `AutoModelForCausalLM.from_pretrained(DIR)` loads (model.safetensors, config.json,
generation_config.json, and the tokenizer for GPT-2 BPE runs). `--adapter_only` writes a peft adapter
directory instead, for `PeftModel.from_pretrained(base, DIR)`.

`--format=gguf` writes one GGUF file (model.gguf, --gguf_type f16 by default, or f32 or q8_0) with the GPT-2
tokenizer and an Ollama Modelfile beside it, for llama.cpp, Ollama and LM Studio; llama.cpp itself loads it
for the check (docs/export.md).

Every export is reloaded and compared with the trained model on a fixed batch: the maximum absolute
difference of the logits is printed, and above the tolerance nothing is written and the exit code is 2.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's trainer, even if another is installed

from trainer.cli import FlagParser, more_than, run_main  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.launcher import read_checkpoints_on_cpu  # noqa: E402


def parse_args(argv):
    p = FlagParser(__doc__)
    p.add_argument("--out_dir", required=True, help="the training run to export (its latest checkpoint)")
    p.add_argument("--export_dir", required=True, help="where to write the model (must not exist or be empty)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the saved weights")
    p.add_argument("--adapter_only", action="store_true", help="write a peft adapter directory, not a merged model")
    p.add_argument("--qlora_base", default="original", choices=("original", "dequantized"),
                   help="QLoRA runs: merge into the original weights, unquantized (default), or into the "
                        "dequantized 4-bit weights the run trained on (the model as trained); docs/lora.md")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf: a transformers model directory (default); gguf: one GGUF file for llama.cpp/Ollama")
    p.add_argument("--gguf_type", default=None, choices=("f32", "f16", "q8_0"),
                   help="--format=gguf: the type of the weight matrices (default f16; q8_0: 8-bit, about half "
                        "f16's size); docs/export.md")
    p.add_flag("--tolerance", type=float, default=None, rule=more_than(0.0),
                   help="maximum absolute logit difference allowed (default: 1e-4 fp32, 1e-2 fp16, 5e-2 bf16; GGUF "
                        "5e-3 f32, 1e-2 f16, q8_0 by its next-token agreement and perplexity instead; times the "
                        "largest logit when that is above 1)")
    return p.parse(argv)


def main(argv):
    args = parse_args(argv)
    if args.gguf_type is not None and args.format != "gguf":
        raise UserError(f"--gguf_type={args.gguf_type} is the type of a GGUF file; add --format=gguf")
    read_checkpoints_on_cpu()
    from trainer.tools.export import export
    export(args.out_dir, args.export_dir, dtype=args.dtype, adapter_only=args.adapter_only, tolerance=args.tolerance,
           qlora_base=args.qlora_base, gguf_type=(args.gguf_type or "f16") if args.format == "gguf" else None)
    return 0


if __name__ == "__main__":
    run_main(main)
