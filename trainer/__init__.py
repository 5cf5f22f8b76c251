"""gpt2-deepspeed-peft's trainer, by domain (docs/design.md draws the map and follows one training step):

  config.py, cli.py, errors.py   the contract every command keeps: keys, flags, one-line errors
  os_errors.py, signals.py       what the OS refuses and SIGINT/SIGTERM, as one line too
  lock.py                        one writer per folder (out_dir, dataset folder, export_dir)
  launcher.py, files.py, units.py  the launcher's environment, atomic writes, byte units
  metrics.py                     the answer metrics (exact match, ROUGE-L, BLEU) training and eval.py share
  data/      what training reads: tokenizers, memory-mapped datasets, the sampler, mixtures
  prepare/   text and instruction records -> datasets (data/**/prepare.py); never imported while training
  model/     GPT-2 as trained: shapes, nanoGPT's checkpoints, the loss, packed attention, LoRA/QLoRA, the builder
  optim/     the optimizer and the learning-rate schedule
  plan/      the memory plan: hardware, memory model, search, reasons, and `--plan --simulate`
  run/       a training run: setup, DeepSpeed engine, the loop, checkpoints, resume and continuation,
             out-of-memory step-down
  tools/     using a trained run: loading, evaluation, export
"""
