"""Optimizer-state codecs by `optim.state_dtype` name."""
from optim.codecs.base import StateCodec
from optim.codecs.cast import BF16, FP32
from optim.codecs.fp8 import FP8
from optim.codecs.int8 import INT8

CODECS: dict[str, StateCodec] = {codec.name: codec for codec in (FP32, BF16, INT8, FP8)}
