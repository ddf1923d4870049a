"""torch.library custom ops over the Triton kernels, so the DiT (attention="triton"), torch.compile and
torch.export can call and trace them:

    torch.ops.flf2v.wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None)
    torch.ops.flf2v.wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)

Arguments and results as `attention.wan_self_attention` / `cross_attention.wan_cross_attention`
(num_heads=None: head_dim = 2 * cos.shape[1]). Dispatch: CUDA tensors run the compiled kernels; CPU tensors
run them through the Triton interpreter when TRITON_INTERPRET=1 was set before flf2v.kernels was imported
(slow, for tests); anything else raises, never silently falls back to the reference. The fake
implementations check shapes and dtypes and give the output metadata for tracing (meta/fake tensors).
"""
from typing import Optional

import torch

from . import attention, cross_attention


@torch.library.custom_op("flf2v::wan_self_attention", mutates_args=())
def wan_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_q_weight: torch.Tensor,
                       norm_k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       num_heads: Optional[int] = None) -> torch.Tensor:
    return attention.wan_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads)


@wan_self_attention.register_fake
def _(q, k, v, norm_q_weight, norm_k_weight, cos, sin, eps, num_heads=None):
    attention.check_self_attention(q, k, v, norm_q_weight, norm_k_weight, cos, sin, num_heads)
    return q.new_empty(q.shape)


@torch.library.custom_op("flf2v::wan_cross_attention", mutates_args=())
def wan_cross_attention(q: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, k_img: torch.Tensor,
                        v_img: torch.Tensor, num_heads: int) -> torch.Tensor:
    return cross_attention.wan_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)


@wan_cross_attention.register_fake
def _(q, k_txt, v_txt, k_img, v_img, num_heads):
    cross_attention.check_cross_attention(q, k_txt, v_txt, k_img, v_img, num_heads)
    return q.new_empty(q.shape)
