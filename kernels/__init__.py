"""Fused Triton attention kernels for the Wan DiT. Importing this package registers the custom ops
torch.ops.flf2v.wan_self_attention and torch.ops.flf2v.wan_cross_attention (see ops.py); the TensorRT
plugins live in trt_plugin.py and import tensorrt only when registered."""
from . import ops  # noqa: F401
