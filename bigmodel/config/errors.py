"""The one exception type for configuration problems."""


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the field and the fix."""
