"""Fault injection for tests of the recovery paths: real failures at chosen iterations.

GPT2DS_INJECT_NAN="5,6" makes the loss of those iterations NaN (a real non-finite loss, whose
backward gives non-finite gradients), so the NaN guard can be tested on a healthy model.
Unset in normal use; reading the variable is the only cost.
"""
import os


def iterations(variable):
    text = os.environ.get(variable, "")
    return {int(part) for part in text.split(",") if part.strip()}


NAN_ITERS = iterations("GPT2DS_INJECT_NAN")


def maybe_poison(loss, iter_num):
    """The loss, or NaN times it when this iteration is listed in GPT2DS_INJECT_NAN."""
    return loss * float("nan") if iter_num in NAN_ITERS else loss
