"""One exception root with a few typed subclasses; library code raises, the CLI exits."""

from __future__ import annotations


class FedfleetError(Exception):
    """Anything fedfleet reports to the user: the message says what and how to fix it."""

    exit_code = 1


class ConfigError(FedfleetError):
    """A stack file or option is missing or invalid (names the file and key)."""

    exit_code = 2


class DataError(FedfleetError):
    """A participant's data is missing or malformed (names the participant and path)."""

    exit_code = 3


class EnvironmentProblem(FedfleetError):
    """Something on this machine stops the run: a port in use, a missing tool."""

    exit_code = 4


class RunFailed(FedfleetError):
    """A started run did not complete every round."""

    exit_code = 5
