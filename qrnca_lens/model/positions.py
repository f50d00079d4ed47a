"""Positions: each row's last real token, from tokens, an attention mask or explicit positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from ..errors import ModelError

__all__ = ["Position", "LAST", "last_real_positions", "positions_from_mask", "row_positions"]


Position = int | Sequence[int] | Tensor | str | None


LAST = "last"  # each row's last position, only where that is unambiguous (one row: nothing to pad)


def last_real_positions(tokens: Int[Tensor, "batch seq"], pad_id: int | None) -> Int[Tensor, " batch"]:
    """Each row's last token that is not a trailing pad (TL's ``to_tokens`` pads right with the pad token).

    Only trailing pads count, so left padding and a pad id inside the text are harmless. A tokenizer whose
    pad token is also its EOS (GPT-2 style) cannot tell a real final EOS from padding: pass positions then.
    """
    if tokens.ndim != 2:
        raise ModelError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    if pad_id is None:
        raise ModelError("the tokenizer has no pad token, so padding cannot be recognised in tokens=: "
                         "pass attention_mask= or positions= (one per row)")
    real = tokens != int(pad_id)
    return _last_true(real, "tokens= (every token is the pad token)")


def positions_from_mask(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """Each row's last position whose attention mask is 1 (right or left padding alike)."""
    if attention_mask.ndim != 2:
        raise ModelError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    return _last_true(attention_mask.bool(), "attention_mask= (all zeros)")


def _last_true(real: Tensor, what: str) -> Tensor:
    empty = (~real.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ModelError(f"row(s) {empty} have no real token in {what}")
    seq = real.shape[1]
    # argmax finds the first maximum, so search the flipped rows for the last real token.
    return (seq - 1 - real.long().flip(1).argmax(dim=1)).long()


def row_positions(position: Position, batch: int, seq: int, device: Any) -> Int[Tensor, " batch"]:
    """Resolve a position spec to one non-negative position per row, or fail naming the fix."""
    if isinstance(position, str):
        if position != LAST:
            raise ModelError(f"unknown position {position!r}: use an int, one int per row, None or {LAST!r}")
        if batch != 1:
            raise ModelError(
                f"a batch of {batch} rows may be right-padded, so position -1 can be a pad token: pass each "
                "row's position (positions=[...] or a Prompt), or tokens= / attention_mask= to find the last "
                "real token of each row")
        position = -1
    if isinstance(position, int):
        pos = torch.full((batch,), position, dtype=torch.long, device=device)
    else:
        pos = torch.as_tensor(position, dtype=torch.long).to(device).flatten()
        if pos.shape[0] != batch:
            raise ModelError(f"got {pos.shape[0]} positions for a batch of {batch} rows: give one per row")
    bad = ((pos < -seq) | (pos >= seq)).nonzero().flatten().tolist()
    if bad:
        raise ModelError(f"position(s) {pos[bad].tolist()} outside a sequence of {seq} tokens "
                         f"(valid: -{seq}..{seq - 1})")
    return pos % seq
