"""Error types shared by the whole platform."""


class InputError(ValueError):
    """Bad user input (file, field, parameter). Never retried: fixing it needs a person.

    The message names the place (``path[:line]``) and what was expected.
    """


class TransientError(RuntimeError):
    """A failure worth retrying (rate limit, timeout, lock held by another process)."""
