"""Errors a user can cause: one clear sentence, a hint, and the CLI's exit code."""

from __future__ import annotations


class CspifyError(Exception):
    """Base of every error cspify raises on purpose.

    ``message`` is one sentence saying what is wrong; ``hint`` says what to do about it.
    The CLI prints both on one line each and exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(CspifyError):
    """A bad option: gamma, fusion, hidden, input shape, stage filter."""

    exit_code = 2


class LoadError(CspifyError):
    """The model spec does not lead to a module: missing file, no candidate, several."""

    exit_code = 3


class TraceError(CspifyError):
    """torch.fx cannot trace the model, or the example inputs do not run through it."""

    exit_code = 4


class NoStageError(CspifyError):
    """The model has no stage (of the kinds asked for) that cspify can convert."""

    exit_code = 5


class OutputError(CspifyError):
    """An output file cannot be written."""

    exit_code = 6


class DataError(CspifyError):
    """Training or calibration data cannot be used: missing folder, no images, unreadable
    file, counts that differ, more classes than the model has outputs, wrong channel count."""

    exit_code = 7
