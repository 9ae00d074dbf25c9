"""The one exception type that user-facing checks raise."""


class GuidanceInputError(ValueError):
    """Bad input found before sampling: the message says what and how to fix it."""
