"""The installed version, in a module of its own so that any module can read it without
importing the package's public API (and everything that pulls in)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("linearize")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
