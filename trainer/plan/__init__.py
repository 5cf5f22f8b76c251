"""The memory plan: the hardware, the memory model, the search over candidate plans, why each key has its
value, how it is printed, and `--plan --simulate` (the plan's step on fake tensors)."""
