"""The optimizer (AdamW's groups and settings) and the learning-rate schedule."""
