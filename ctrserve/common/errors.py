"""The base of every error caused by user input; the CLI prints these as one line."""


class UserError(ValueError):
    """Bad input (a file, a field, a flag): the message names it and the problem."""
