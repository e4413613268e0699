"""Exceptions and input checks shared across omnitransfer."""

import math


class InputError(ValueError):
    """A problem with user-supplied input; the message is one line naming the input and what was expected."""


class PeerStopped(InputError):
    """Raised on every process of a distributed command when another one stopped on an error it reported
    itself; the command line exits with status 2 without repeating it."""


class InputWarning(UserWarning):
    """Usable input that is not what it says it is (e.g. a video with fewer frames than its container reports);
    the command line prints it as one line."""


def check_positive(value: float) -> bool:
    """Whether ``value`` is a finite number above 0 (NaN and infinity are not)."""
    return math.isfinite(value) and value > 0


def check_sampler(flow_shift: float | None, guidance_scale: float | None,
                  names: tuple[str, str] = ("flow shift", "guidance scale")) -> None:  # fmt: skip
    """InputError naming the input (``names``: how the flow shift and the guidance scale are called where they
    came from) unless the flow shift is a positive number and the guidance scale finite; None: not given."""
    if flow_shift is not None and not check_positive(flow_shift):
        raise InputError(f"{names[0]} {flow_shift!r}: expected a positive number")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise InputError(f"{names[1]} {guidance_scale!r}: expected a finite number")


#: seeds are what torch.Generator.manual_seed takes, from 0
MAX_SEED = 2**63 - 1


def check_seed(value, what: str = "seed") -> int:
    """``value`` if it is an integer in 0..MAX_SEED; InputError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{what} {value!r}: expected an integer from 0 to {MAX_SEED}")
    return value


def seed(text: str) -> int:
    """argparse type of every ``--seed``: an integer in 0..MAX_SEED (argparse names the option on failure)."""
    import argparse

    try:
        return check_seed(int(text))
    except ValueError:  # not an integer, or out of range (InputError is a ValueError)
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}") from None
