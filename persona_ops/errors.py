"""Error types shared by the whole platform."""


class InputError(ValueError):
    """Bad user input (file, field, parameter). Never retried: fixing it needs a person.

    The message names the place (``path[:line]``) and what was expected.
    """


class TransientError(RuntimeError):
    """A failure worth retrying (rate limit, timeout, lock held by another process)."""


class ServiceError(InputError):
    """An external service refused a request (4xx) or kept answering with something unusable (a reply
    without logprobs, a malformed body) after the client's retries. Deterministic, so never retried:
    the endpoint, the model or the request needs a person. Reported like bad input."""
