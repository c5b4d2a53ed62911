"""ebb's parameter names as the Hugging Face formats see them: `blocks.{i}.` prefixes a block's."""
from __future__ import annotations

import re

BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The block an ebb parameter name is in (None for the embedding, final norm and head)."""
    match = BLOCK.match(name)
    return int(match.group(1)) if match else None
