"""Preparing datasets: text corpora and instruction records -> train.bin/val.bin (+ masks) and meta.pkl.
Run by data/**/prepare.py; a training run never imports it."""
