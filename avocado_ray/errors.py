"""Errors a run reports to its operator as one message (the CLI prints it without a traceback)."""


class RunError(RuntimeError):
    """A run that cannot go on (its trainer failed, say); the message says why, and a rerun on the same run
    directory resumes it."""
