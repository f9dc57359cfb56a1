"""The error a user can cause: the CLI prints its message and exits 2, without a traceback."""


class FedsimError(Exception):
    """Bad input (scenario, file, flag, missing package): a message for the user, not a bug."""

    exit_code = 2
