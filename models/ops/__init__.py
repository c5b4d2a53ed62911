"""Sequence-mixing ops with fla's signatures. TEMPORARY: chunk_* alias the step recurrences
until the chunked pure-PyTorch forms land (the ops helper replaces this file)."""
from models.ops.recurrent import (
    recurrent_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_simple_gla,
)

chunk_simple_gla = recurrent_simple_gla
chunk_delta_rule = recurrent_delta_rule
chunk_gated_delta_rule = recurrent_gated_delta_rule
