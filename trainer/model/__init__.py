"""GPT-2 as the trainer trains it: shapes and counts, the model, the chunked loss, attention for packed
batches, LoRA/QLoRA adapters, sampling, and the one builder of the trained module."""
