"""User-facing errors.

Anything a user can cause (a bad file, a missing optional dependency, a dataset that is not
complete) raises :class:`GsavatarError` with a one-line message naming the problem. The CLI
prints it as ``error: <message>`` and exits with a non-zero status; library callers can catch it.
"""


class GsavatarError(Exception):
    """An error caused by the user's input or environment, with a one-line explanation."""

    exit_code = 2


class InputError(GsavatarError):
    """The input file cannot be used (not a video, no audio, no face, too short, corrupt...)."""


class MissingDependencyError(GsavatarError):
    """An optional dependency (or model weights that must be present locally) is missing."""

    exit_code = 3


class IncompleteDatasetError(GsavatarError):
    """A subject dataset exists but one or more preprocessing stages did not finish."""


class BatchFailed(GsavatarError):
    """Some jobs of a batch failed (each one's reason is in its report); the others ran."""

    exit_code = 1


class StoppedBySignal(GsavatarError):
    """A long job stopped on SIGINT / SIGTERM after saving its state (the same command resumes it)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)  # the shell's convention for "ended by signal N"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a job scheduler, ``kill``) turned into an exception by the command line,
    so a long command unwinds exactly as on Ctrl-C: temporary files removed, finished work kept."""

    exit_code = 143  # 128 + SIGTERM
