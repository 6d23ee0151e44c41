"""sinkless: find and repair attention sinks, massive activations and high-norm artifact tokens."""

from sinkless._version import __version__

__all__ = ["__version__"]
