"""Exception types that the command line turns into exit codes (see DESIGN.md, Conventions)."""


class PtqauditError(Exception):
    """Bad input or usage: the CLI prints the message as one line and exits with code 2."""

    exit_code = 2


class GateFailed(Exception):
    """The audit's gate failed (the model is not safe to ship): exit code 1."""

    exit_code = 1
