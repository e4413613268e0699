"""Exceptions shared across omnitransfer."""


class InputError(ValueError):
    """A problem with user-supplied input; the message is one line naming the input and what was expected."""
