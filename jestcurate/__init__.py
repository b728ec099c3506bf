"""jestcurate: offline JEST data curation for image-text corpora."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("jestcurate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
