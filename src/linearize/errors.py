"""The one exception type the CLI turns into a one-line message."""


class LinearizeError(Exception):
    """Bad input or an unsupported situation, explained in one line for the user."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message: what a one-line error can show."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
