"""User-facing errors. The CLI prints their message on one line and exits 1, without a traceback."""


class CxrError(Exception):
    """A mistake in the user's input or setup. The message names the file, row or column at fault."""


class ManifestError(CxrError):
    """A label table, raw tree or manifest is unusable as given."""
