"""The error type for bad user input (configs, data, checkpoints, prompts).

Entry points catch `UserInputError` and print its one-line message with exit status 2; any
other exception is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Input that cannot be used; the message names the value and says how to fix it."""
