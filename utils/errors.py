"""The error every check raises for a mistake in the command, the input or the environment."""


class UserError(Exception):
    """A mistake in the command, the input or the environment: reported as one line, exit status 2."""
