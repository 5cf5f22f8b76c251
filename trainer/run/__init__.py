"""A training run: its setup, the DeepSpeed engine, the loop, checkpoints, resume, several ranks and nodes,
out-of-memory step-down, signals, logging, and the test-only fault injection."""
