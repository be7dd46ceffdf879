"""radnode: a DICOM-native PACS node and batch processor for lung-cancer CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("radnode")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
