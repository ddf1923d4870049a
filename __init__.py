"""flf2v: compiled-engine inference runtime for Wan2.1 FLF2V-14B and I2V-14B.

`from flf2v import Pipeline` is the Python API (runtime/pipeline.py); it is imported on first use, so
`import flf2v` stays light (no torch) for the console scripts' argument checks."""
__version__ = "0.1.0"
__all__ = ["Pipeline", "Request", "InputError"]


def __getattr__(name: str):
    if name in ("Pipeline", "Request"):
        from flf2v.runtime import pipeline
        return getattr(pipeline, name)
    if name == "InputError":
        from flf2v.runtime.media import InputError
        return InputError
    raise AttributeError(f"module 'flf2v' has no attribute {name!r}")
