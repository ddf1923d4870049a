"""Ulysses sequence parallelism for the DiT: the video tokens split across the U ranks of a process group.

Each rank runs the blocks on its 1/U of the tokens (the sequence zero-padded at its end to a multiple of U).
Everything in a block is per token except self-attention: there an all-to-all turns the token shards of all
heads into all tokens of H/U heads, attention runs on the local heads (SDPA or the fused Triton kernel),
and a second all-to-all turns the result back. RMSNorm and RoPE run on the local shard before the first
all-to-all (SDPA path), or, for the fused kernel, the per-token RMS statistics over the full dim are computed
on the shard and gathered with the tokens (the kernel normalises and rotates the local heads as it loads
them, kernels/ops.py `wan_self_attention_heads`). Padded tokens never reach a real token: attention runs on
the first L tokens only (padding sits past them) and the blocks' output is un-padded after the final
all-gather. Cross-attention needs no communication (every rank holds the text and image keys).
Communication per block: 4 all-to-alls of [B, L, dim/U] per rank (q, k, v in, attention out), ~4 B L dim
(U-1)/U^2 elements sent per rank, plus, on the fused-kernel path, 2 all-gathers of the [B, L/U] RMS statistics;
bench/parallel.py models its cost.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .dit import apply_rope, rms_norm


class SequenceParallel:
    """The Ulysses group of one rank: `size` ranks, this one `rank` in it, over `group`."""

    def __init__(self, group, size: int, rank: int):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} of a sequence-parallel group of {size}")
        self.group, self.size, self.rank = group, size, rank

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.size:
            raise ValueError(f"--ulysses_size {self.size} must divide the DiT's {num_heads} attention heads")

    def padded(self, n: int) -> int:
        return -(-n // self.size) * self.size

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's rows of x along `dim`, x zero-padded there to a multiple of the group size."""
        n = x.shape[dim]
        pad = self.padded(n) - n
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
        return x.chunk(self.size, dim=dim)[self.rank].contiguous()

    def gather(self, x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
        """Every rank's shard x concatenated along `dim` and un-padded to n rows."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, n)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Ls, C] token shard of all channels -> [B, U*Ls, C/U]: every token of this rank's channel
        group (heads r*H/U .. (r+1)*H/U - 1 when C = dim)."""
        b, ls, c = x.shape
        u = self.size
        send = x.view(b, ls, u, c // u).permute(2, 0, 1, 3).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 0, 2, 3).reshape(b, u * ls, c // u)

    def to_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads`: [B, U*Ls, C/U] -> [B, Ls, C]."""
        b, lp, cu = y.shape
        u = self.size
        send = y.view(b, u, lp // u, cu).permute(1, 0, 2, 3).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3).reshape(b, lp // u, u * cu)

    def attention(self, kind: str, cos: torch.Tensor, sin: torch.Tensor, n: int, num_heads: int):
        """The self-attention callable for the blocks on token shards (signature of models.dit's
        `self_attention_ref`); `cos`, `sin` [n, D/2] are the tables of all n real tokens."""
        return UlyssesSelfAttention(self, kind, cos, sin, n, num_heads)


class UlyssesSelfAttention:
    """(q, k, v [B, Ls, dim] raw projections of this rank's tokens, norm weights, local cos/sin, eps)
    -> [B, Ls, dim], equal to the single-process self-attention on these tokens."""

    def __init__(self, sp: SequenceParallel, kind: str, cos, sin, n: int, num_heads: int):
        sp.check_heads(num_heads)
        if kind not in ("sdpa", "triton"):  # the 8-bit kernel takes no per-head RMS statistics yet
            raise ValueError(f"attention={kind!r} runs in one process; Ulysses takes 'sdpa' or 'triton'")
        self.sp, self.kind, self.cos, self.sin, self.n, self.num_heads = sp, kind, cos, sin, n, num_heads

    def __call__(self, q, k, v, norm_q_weight, norm_k_weight, cos_local, sin_local, eps: float):
        sp, n = self.sp, self.n
        heads = self.num_heads // sp.size
        if self.kind == "sdpa":
            d = 2 * cos_local.shape[-1]
            q = apply_rope(rms_norm(q, norm_q_weight, eps).unflatten(-1, (-1, d)), cos_local, sin_local)
            k = apply_rope(rms_norm(k, norm_k_weight, eps).unflatten(-1, (-1, d)), cos_local, sin_local)
            q, k = q.flatten(2).to(v.dtype), k.flatten(2).to(v.dtype)
            q, k, vh = (sp.to_heads(t)[:, :n].unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, vh).transpose(1, 2).flatten(2)
        else:  # the fused kernel on the local heads, given the full-dim RMS statistics of every token
            rq = torch.rsqrt(q.float().pow(2).mean(-1) + eps)
            rk = torch.rsqrt(k.float().pow(2).mean(-1) + eps)
            rq, rk = (sp.gather(r[..., None], n)[..., 0].contiguous() for r in (rq, rk))
            c = q.shape[-1] // sp.size
            w = slice(sp.rank * c, (sp.rank + 1) * c)
            q, k, vh = (sp.to_heads(t)[:, :n] for t in (q, k, v))
            out = torch.ops.flf2v.wan_self_attention_heads(q, k, vh, norm_q_weight[w].contiguous(),
                                                           norm_k_weight[w].contiguous(), self.cos, self.sin,
                                                           rq, rk, heads)
        pad = sp.padded(n) - n
        if pad:
            out = torch.cat([out, out.new_zeros(out.shape[0], pad, out.shape[2])], dim=1)
        return sp.to_tokens(out)
