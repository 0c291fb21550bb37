"""argparse `type=` functions that range-check a number where it is parsed.

A value out of range then ends in argparse's usage error naming the flag ("argument
--repeats: must be >= 1, got 0", exit 2), instead of a traceback minutes later.
"""
import argparse
import math


def bounded_int(low, high=None):
    """A type= function for integers in [low, high] (no upper bound when high is None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    parse.__name__ = 'integer'   # argparse names the type in some messages
    return parse


positive_int = bounded_int(1)
nonnegative_int = bounded_int(0)
# the seeds a run can be replayed with everywhere (NumPy's generators take 32 bits)
seed_int = bounded_int(0, 2 ** 32 - 1)


def positive_float(text):
    """A type= function for finite numbers above 0 (float() alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
