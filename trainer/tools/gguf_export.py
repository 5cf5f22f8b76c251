"""A GPT-2 as one GGUF file for llama.cpp, Ollama and LM Studio, checked by llama.cpp itself.

The file is written with the `gguf` package (llama.cpp's own writer): the tensors under the names llama.cpp's
`gpt2` architecture reads (gguf's tensor name map of MODEL_ARCH.GPT2), the hyperparameters it reads
(context length, width, layers, heads, feed-forward width, LayerNorm epsilon) and the GPT-2 BPE tokenizer
(encoder.json's tokens, vocab.bpe's merges, <|endoftext|> as the end-of-text and control token, the `gpt-2`
pre-tokenizer), so that llama.cpp tokenizes text as tiktoken does. The check (tools/export.check_parity) loads
the file with llama.cpp's runtime (the llama-cpp-python package), feeds it the export's fixed batch of ids and
compares its logits with the trained model's; it also tokenizes a fixed text with llama.cpp and with tiktoken.
docs/export.md says what each type keeps and how it is checked.
"""
import math
from pathlib import Path

import numpy as np
import torch

from trainer.data.tokenizer import ENDOFTEXT, GPT2_EOT, Gpt2Tokenizer, gpt2_vocab_and_merges
from trainer.model.nanogpt import LINEAR_WEIGHTS as PROJECTIONS  # GPT-2's four Conv1D weights, kept (in, out)

GGUF_FILE = "model.gguf"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"  # shipped with the repo
MODELFILE = "Modelfile"
# What llama.cpp computes differs from the trained model even in f32: its CPU GELU reads a table of fp16
# values (the input rounded to fp16, the output an fp16), nanoGPT's models use the exact GELU where llama.cpp
# has the tanh one (at most 5e-4 apart), and f16 rounds every weight matrix. Relative to the largest reference
# logit (at least 1), like the transformers export's tolerances (tools/export.py).
RELATIVE_TOLERANCE = {"f32": 5e-3, "f16": 1e-2}
# q8_0 rounds every weight to 8 bits: checked as a quantized model is, by what it predicts. On the fixed batch,
# at least this share of the next-token choices (argmax) are the trained model's; on val text, its perplexity
# within this fraction of the trained model's.
Q8_MIN_AGREEMENT = 0.90
Q8_MAX_PERPLEXITY_CHANGE = 0.02
PERPLEXITY_WINDOWS = 4  # val windows of block_size tokens (at most 256) for q8_0's perplexity
# Letters, digits, contractions, punctuation, runs of spaces and newlines, non-ASCII text and <|endoftext|>:
# the pre-tokenizer's cases, tokenized by llama.cpp (special tokens parsed) and by tiktoken.
TOKENIZER_TEXT = ("Hello, world! It's 2026: we'll test GPT-2's BPE -- 12,345 tokens?\n\n"
                  "  Indented   spaces\tand tabs.\nCafé, naïve, 東京, emoji 🙂."
                  f"{ENDOFTEXT}ROMEO: What, ho! I've\r\nseen 'em all... ")


def tensor_type(gguf_type, array):
    """The GGML type an array is stored as: 1-D tensors (LayerNorms, biases) in f32 as llama.cpp's converter
    keeps them, matrices in the chosen type (q8_0 needs rows that are whole blocks of 32: else f16)."""
    from gguf import GGMLQuantizationType as Q
    if array.ndim == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16


def gpt2_vocab(n_vocab):
    """(tokens, token types, merges) of GPT-2's BPE as llama.cpp's `gpt2` tokenizer reads them; rows past
    GPT-2's 50,257 (a vocabulary padded for speed) are unused placeholders, never produced."""
    from gguf import TokenType
    encoder, merges = gpt2_vocab_and_merges()
    by_id = {i: token for token, i in encoder.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [TokenType.CONTROL if i == GPT2_EOT else TokenType.NORMAL if i in by_id else TokenType.UNUSED
             for i in range(n_vocab)]
    return tokens, types, merges


def write_gguf(model, path, gguf_type, name):
    """A GPT2LMHeadModel (biases present: zero where a model trained without them) as a GGUF file; returns
    {GGML type name: number of tensors}."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gpt2_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(GPT2_EOT)
    writer.add_eos_token_id(GPT2_EOT)
    writer.add_add_bos_token(False)  # GPT-2 reads text as it is: no token is put in front

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    counts = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output matrix from token_embd when `output` is absent
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {key}")  # not a GPT-2: load_pretrained refuses those first
        array = tensor.detach().float()
        array = (array.t() if key.endswith(PROJECTIONS) else array).contiguous().numpy()  # (out, in)
        qtype = tensor_type(gguf_type, array)
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def ollama_template(template):
    """A prompt template (trainer/prepare/templates.py) in Ollama's Go template syntax: the user's message
    where the instruction goes, a system message where the header goes."""
    instruction = template.instruction.split("{instruction}")
    return ("{{ if .System }}{{ .System }}\n\n{{ else }}" + template.header + "{{ end }}" + instruction[0] +
            "{{ .Prompt }}" + instruction[1] + template.response + "{{ .Response }}")


def write_modelfile(folder, context_length, template_name):
    """Ollama's Modelfile beside the file: `ollama create NAME -f Modelfile` reads it."""
    from trainer.prepare.templates import get_template
    lines = [f"FROM ./{GGUF_FILE}", f"PARAMETER num_ctx {context_length}", f'PARAMETER stop "{ENDOFTEXT}"']
    if template_name:
        lines.append(f'TEMPLATE """{ollama_template(get_template(template_name))}"""')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')  # a language model continues the text as it is
    (folder / MODELFILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


class LlamaCppModel:
    """The file as llama.cpp's runtime loads it (llama-cpp-python), for the checks."""

    def __init__(self, path, n_ctx):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         verbose=False, seed=0)

    def logits(self, idx):
        """(rows, T, vocab) float32 logits of each row of ids, each row a fresh sequence."""
        rows = []
        for row in idx.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[:len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self):
        self.llm.close()


def tokenizer_mismatch(llama):
    """None when llama.cpp's tokens of TOKENIZER_TEXT are tiktoken's, else where they first differ."""
    ours, theirs = Gpt2Tokenizer().encode(TOKENIZER_TEXT), llama.tokenize(TOKENIZER_TEXT)
    if ours == theirs:
        return None, len(ours)
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"token {at}: tiktoken {ours[at:at + 3]}, llama.cpp {theirs[at:at + 3]}", len(ours)


def val_windows(folder, meta, block_size):
    """(x, y): PERPLEXITY_WINDOWS windows spread over the dataset's val.bin in `folder`, or over the tail of the
    repo's tiny Shakespeare when the run's data is gone; and where they came from."""
    path = None if folder is None else Path(folder) / "val.bin"
    T = min(block_size, 256)
    if path is not None and path.is_file():
        ids, where = np.memmap(path, dtype=np.dtype(meta.get("dtype", "uint16")), mode="r"), str(path)
    else:
        text = SHAKESPEARE.read_text(encoding="utf-8")
        ids, where = np.array(Gpt2Tokenizer().encode_ordinary(text[-len(text) // 10:])), f"the tail of {SHAKESPEARE}"
    starts = np.linspace(0, len(ids) - T - 1, PERPLEXITY_WINDOWS).astype(np.int64)
    windows = torch.from_numpy(np.stack([ids[s:s + T + 1] for s in starts]).astype(np.int64))
    return windows[:, :-1], windows[:, 1:], where


def perplexity(logits, targets):
    return math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                            targets.reshape(-1))))


def quantized_criteria(out, reference, ppl, trained_ppl, text):
    """[(line, passed)]: a q8_0 file's next-token agreement with the trained model on the fixed batch (the share
    of positions where both pick the same token), and its perplexity on `text` against the trained model's."""
    agree = float((out.argmax(-1) == reference.argmax(-1)).float().mean())
    change = abs(ppl / trained_ppl - 1)
    return [(f"next-token agreement on the fixed batch {agree:.1%} (at least {Q8_MIN_AGREEMENT:.0%})",
             agree >= Q8_MIN_AGREEMENT),
            (f"perplexity on {text} {ppl:.3f} vs the trained model's {trained_ppl:.3f}: {change:.2%} apart (at "
             f"most {Q8_MAX_PERPLEXITY_CHANGE:.0%})", change <= Q8_MAX_PERPLEXITY_CHANGE)]
