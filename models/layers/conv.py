"""The short causal convolution of Mamba2, DeltaNet and Gated DeltaNet."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.context import active_piece, conv_halo, no_cache, shifted, stream_tails
from models.layers.fla_modules import fla_kernel_for
from models.packing import positions_in_documents


class ShortConv(nn.Conv1d):
    """Depthwise causal conv1d over [B, T, C] (kernel W, optional bias, optional SiLU after).

    The weight is nn.Conv1d's [C, 1, W], so Mamba2's `conv1d` loads 1:1 from transformers;
    the initialisation is nn.Conv1d's unless the mixer re-initialises it.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, activation: bool = True):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)
        self.activation = activation

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, tail: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, T, C] -> (y [B, T, C], the last W-1 inputs [B, W-1, C] to continue from).

        `tail` holds the W-1 inputs that precede x (zeros when None). With `cu_seqlens`
        (B = 1, packed documents) no tap reaches before the start of its token's document.

        The convolution is computed as W shifted multiply-adds: on CPU that is several times
        faster than the depthwise conv1d kernel, whose backward dominates the whole layer. On
        CUDA in eager mode, from no tail, it is fla's fused kernel (models/layers/fla_modules.py).
        """
        B, T, C = x.shape
        W = self.kernel_size[0]
        if tail is None and T >= W - 1 and (fused := fla_kernel_for(x, "fla.modules.convolution", "causal_conv1d")) is not None:
            y, _ = fused(x, self.weight[:, 0], self.bias, activation="silu" if self.activation else None, cu_seqlens=cu_seqlens)
            return y, x[:, T - (W - 1):]
        if tail is None:
            tail = x.new_zeros(B, W - 1, C)
        history = torch.cat([tail.to(x.dtype), x], dim=1)
        position = None if cu_seqlens is None else positions_in_documents(cu_seqlens, T)[:, None]
        taps = self.weight[:, 0].to(x.dtype)  # [C, W]; tap W-1 weighs the current token; bf16 under autocast, as conv1d would
        y = x * taps[:, W - 1] if self.bias is None else torch.addcmul(self.bias.to(x.dtype), x, taps[:, W - 1])
        for lag in range(1, W):
            earlier = history[:, W - 1 - lag : W - 1 - lag + T]
            if position is not None:
                earlier = earlier * (position >= lag)
            y = torch.addcmul(y, earlier, taps[:, W - 1 - lag])
        if self.activation:
            y = F.silu(y)
        return y, history[:, history.shape[1] - (W - 1):]


def conv_features(conv: ShortConv | None, x: Tensor, cu_seqlens: Tensor | None, cache: dict | None, key: str) -> Tensor:
    """SiLU(ShortConv(x)) continuing from (and updating) `cache[key]`; SiLU(x) for mixers
    built without a short convolution (fla applies the activation either way)."""
    if conv is None:
        return F.silu(x)
    piece = active_piece()
    no_cache(piece, cache)
    if piece is not None:
        return conv_halo(piece, conv, x, cu_seqlens, conv.kernel_size[0] - 1)
    y, tail = conv(x, cu_seqlens, None if cache is None else cache.get(key))
    if cache is not None:
        cache[key] = tail
    return y


def segment_conv(conv: ShortConv, x: Tensor, cu_seqlens: Tensor, tails: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """ShortConv over the segments of x [R, C], each its own stream. With `tails` [S, W-1, C]
    each segment continues from its own W-1 preceding inputs, and the new tails (the last W-1
    inputs of each tail + segment, so an empty segment keeps its tail) come back. Under context
    parallelism each segment continuing a stream of the earlier pieces starts from that stream's
    inputs there (`stream_tails`)."""
    piece = active_piece()
    if piece is not None and tails is None:
        tails = stream_tails(piece, x, cu_seqlens, conv.kernel_size[0] - 1)
        return segment_conv(conv, x, cu_seqlens, tails)[0], None
    if tails is None:
        return conv(x[None], cu_seqlens)[0][0], None
    lag = conv.kernel_size[0] - 1
    n_segments = tails.shape[0]
    taps = torch.arange(lag, device=x.device)
    extended_cu = cu_seqlens + lag * torch.arange(n_segments + 1, device=x.device)
    segment = torch.repeat_interleave(torch.arange(n_segments, device=x.device), cu_seqlens.diff())
    token_at = torch.arange(x.shape[0], device=x.device) + lag * (segment + 1)
    tail_at = (extended_cu[:-1, None] + taps).flatten()
    extended = x.new_zeros(x.shape[0] + lag * n_segments, x.shape[1])
    extended = extended.index_copy(0, token_at, x).index_copy(0, tail_at, tails.flatten(0, 1).to(x.dtype))
    y = conv(extended[None], extended_cu)[0][0].index_select(0, token_at)
    new_tails = extended.index_select(0, (extended_cu[1:, None] - lag + taps).flatten()).view_as(tails)
    return y, new_tails


def token_shift(x: Tensor, cu_seqlens: Tensor | None, cache: dict | None, key: str) -> Tensor:
    """x_{t-1} for every token of x [B, T, C] (RWKV's token shift, a width-2 causal window): zero
    at a document start (`cu_seqlens`, B = 1), and before the first token the last token of the
    previous call kept in `cache[key]` (zero without one), which is then updated. Under context
    parallelism, before each row the previous piece's last token."""
    piece = active_piece()
    no_cache(piece, cache)
    if piece is not None:
        return shifted(piece, x, cu_seqlens)
    before = x.new_zeros(x.shape[0], 1, x.shape[2]) if cache is None or key not in cache else cache[key].to(x.dtype)
    previous = torch.cat([before, x[:, :-1]], dim=1)
    if cu_seqlens is not None:
        previous = previous * (positions_in_documents(cu_seqlens, x.shape[1]) > 0)[:, None]
    if cache is not None:
        cache[key] = x[:, -1:]
    return previous
