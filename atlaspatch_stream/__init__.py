"""atlaspatch-stream: a streaming, drop-in re-implementation of AtlasPatch."""

__version__ = "0.1.0"
