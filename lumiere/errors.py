"""User-facing errors.

Anything raised as a `LumiereError` is a problem with the user's input (a config key, a path, a frame count),
not a bug: the CLI prints its message on one line, without a traceback, and exits with status 2.
"""


class LumiereError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class ConfigError(LumiereError, ValueError):
    """A bad config value or override; the message names the key."""


class FrameCountError(LumiereError, ValueError):
    """A clip whose frame count the STUNet cannot halve the configured number of times."""
