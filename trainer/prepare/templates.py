"""Prompt templates of instruction data: how a record becomes the text the model reads.

Training (trainer/prepare/records.py renders every record with them) and asking a trained model
(launch/sample.py, launch/eval.py --generate) use the same template, so the model is asked exactly as it
was taught.
"""
from dataclasses import dataclass

from trainer.errors import UserError


@dataclass(frozen=True)
class Template:
    """prompt = header + instruction [+ input] + response marker; the response follows, then <|endoftext|>."""
    name: str
    header: str  # the preamble without an input (a chat's system message replaces it)
    header_input: str  # the preamble when the record has an input
    instruction: str  # format string with {instruction}
    input: str  # format string with {input}
    response: str  # what comes right before the response

    def prompt(self, instruction, input="", system=None, first=True):
        """The prompt text for one instruction (one user turn of a chat)."""
        if not first:
            header = ""
        elif system is not None:
            header = system + "\n\n"
        else:
            header = self.header_input if input else self.header
        text = header + self.instruction.format(instruction=instruction)
        if input:
            text += self.input.format(input=input)
        return text + self.response


TEMPLATES = {
    # Stanford Alpaca's PROMPT_DICT, character for character.
    "alpaca": Template(
        name="alpaca",
        header="Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.\n\n",
        header_input="Below is an instruction that describes a task, paired with an input that provides "
                     "further context. Write a response that appropriately completes the request.\n\n",
        instruction="### Instruction:\n{instruction}\n\n",
        input="### Input:\n{input}\n\n",
        response="### Response:\n",
    ),
    # The fewest tokens: the instruction, the input, a blank line after each, then the response.
    "plain": Template(name="plain", header="", header_input="", instruction="{instruction}\n\n",
                      input="{input}\n\n", response=""),
}


def instruction_prompt(template, instruction, input_text=""):
    """The prompt of an Alpaca record exactly as training renders it (sample.py asks with the same text).

    An input of only white space counts as none (the header without input), as in render().
    """
    return template.prompt(instruction, input_text if input_text and input_text.strip() else "")


def get_template(name):
    if name not in TEMPLATES:
        raise UserError(f"unknown prompt template {name!r}; choose {' or '.join(TEMPLATES)}")
    return TEMPLATES[name]
