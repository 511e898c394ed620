"""Cohorts and labels: which images, which labels, which split. Knows nothing of pixels."""
from manifests.errors import CxrError, ManifestError

__version__ = "0.1.0"

__all__ = ["CxrError", "ManifestError", "__version__"]
