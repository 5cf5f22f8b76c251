"""Using a trained run: loading it (or an HF model) for sampling and evaluation, evaluation, export."""
