"""Helpers shared by the command-line entry points: how bad input is reported.

Every entry point catches `UserInputError` (configs, data, checkpoints, prompts, conversions)
and prints it as one `error: ...` line on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import sys

# Exit status for bad input, the argparse convention for usage errors.
EXIT_USER_ERROR = 2


def one_line(error: BaseException) -> str:
    """Join a possibly multi-line error message into one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def report_user_error(error: BaseException) -> int:
    """Print `error: <message>` on stderr and return EXIT_USER_ERROR."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return EXIT_USER_ERROR
