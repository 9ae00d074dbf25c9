"""The one exception type that user-facing checks raise."""


class GuidanceInputError(ValueError):
    """Bad input found before sampling: the message says what and how to fix it."""


# ComfyUI names an exception's type by its module (the error dialog, the log), and loads this pack under the path of
# its folder: without this the type reads "/path/to/custom_nodes/<pack>.guidance.errors.GuidanceInputError".
GuidanceInputError.__module__ = "personalization_guidance"
