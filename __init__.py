"""flf2v: compiled-engine inference runtime for Wan2.1 FLF2V-14B and I2V-14B."""
__version__ = "0.1.0"
