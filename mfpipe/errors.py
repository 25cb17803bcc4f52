"""The one exception type for problems a user can cause and fix."""


class MfpipeError(Exception):
    """A user-facing error: bad file, bad config, unreachable server.

    The message is one line (the CLI prints it without a traceback). `exit_code` follows the CLI
    contract: 2 for bad input or usage, 1 for a run that failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
