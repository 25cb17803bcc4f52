"""The one exception type for problems a user can cause and fix, and the one way to say an error in a line."""


class MfpipeError(Exception):
    """A user-facing error: bad file, bad config, unreachable server.

    The message is one line (the CLI prints it without a traceback). `exit_code` follows the CLI
    contract: 2 for bad input or usage, 1 for a run that failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


class TransientError(MfpipeError):
    """A failure that may pass when tried again (network, a server restarting): the flow retries these."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message, exit_code)


def is_transient(exc: BaseException | None) -> bool:
    """True for a TransientError or an OS-level failure (connection, timeout) anywhere in the cause chain."""
    while exc is not None:
        if isinstance(exc, TransientError | OSError | ConnectionError | TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line (servers answer with pages), prefixed with its type
    unless it is our own message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if isinstance(exc, MfpipeError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
