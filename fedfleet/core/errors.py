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


class CredentialError(FedfleetError):
    """A cloud refused a credential, or could not be reached to check it; or a stack needs
    one that is not there. `reason`: rejected, expired, permission, not-found, unreachable,
    missing."""

    exit_code = 7

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
