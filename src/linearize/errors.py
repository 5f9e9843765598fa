"""The one exception type the CLI turns into a one-line message."""


class LinearizeError(Exception):
    """Bad input or an unsupported situation, explained in one line for the user."""
