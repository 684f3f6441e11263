"""atlaspatch-stream: a streaming, drop-in re-implementation of AtlasPatch.

The public API is re-exported here lazily, so `import atlaspatch_stream` loads neither torch nor cv2.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "PipelineConfig",
    "RunSummary",
    "SlideJob",
    "SlideResult",
    "load_config",
    "make_jobs",
    "open_pipeline",
    "process_slides",
    "serve_folder",
    "check_outputs",
    "write_report",
    "AtlasPatchError",
    "SlideError",
    "WeightsError",
    "ConfigError",
]

_WHERE = {
    "PipelineConfig": "config",
    "load_config": "config",
    "RunSummary": "api",
    "make_jobs": "api",
    "open_pipeline": "api",
    "process_slides": "api",
    "serve_folder": "api",
    "check_outputs": "api",
    "write_report": "api",
    "SlideJob": "items",
    "SlideResult": "items",
    "AtlasPatchError": "errors",
    "SlideError": "errors",
    "WeightsError": "errors",
    "ConfigError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'atlaspatch_stream' has no attribute {name!r}")
