"""One root for every error tracker raises, so callers can catch them all.

The CLI maps ``exit_code`` straight to the process exit status: 2 for input the
user can fix by changing the command, 1 for the world being wrong (Redis down).
"""


class TrackerError(Exception):
    """Root of all tracker errors."""

    exit_code = 1


class ValidationError(TrackerError, ValueError):
    """Bad input: the message names the field. Nothing was stored."""

    exit_code = 2

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class ConfigError(TrackerError):
    """A setting is missing, malformed or contradicts what Redis holds."""

    exit_code = 2


class RedisUnavailable(TrackerError):
    """Redis could not be reached or answered with an error we cannot handle."""

    exit_code = 1


class NotDurable(RedisUnavailable):
    """Durable publish: fewer replicas than ``durable_replicas`` acknowledged an append
    in time. The events may be in the log anyway; publishing again is safe (at-least-once)."""
