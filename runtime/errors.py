"""The one hierarchy of errors a user can cause.

Each carries a one-line message that says what is wrong and what to do. The CLIs turn
them into `click.ClickException`s (no traceback, exit code 1) and the HTTP server into
OpenAI-style JSON errors; nothing else needs to know about them.
"""


class LlamaboxError(Exception):
    """An error the user can fix; its message is shown as is."""


class BundleError(LlamaboxError):
    """A bundle file is damaged, incomplete or not a bundle at all."""


class IncompleteBundleError(BundleError):
    """The bundle is shorter than it should be: typically a download cut short."""


class ModelFileError(LlamaboxError):
    """A model file is missing, unreadable or not a valid GGUF."""


class StubError(LlamaboxError):
    """A file given as a runtime stub is not one."""


class BackendError(LlamaboxError):
    """No usable compute backend could be loaded."""
