"""The error every check raises for a mistake in the command, the input or the environment."""


class UserError(Exception):
    """A mistake in the command, the input or the environment: reported as one line, exit status 2."""


class InputError(UserError):
    """The input cannot be read as given; the message is one line naming the file."""
