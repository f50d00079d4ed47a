"""Small HTML helpers of every display (the report, notebook views of results): escaping, numbers, tables, notes,
inline images, tokens. Pure string functions at the ground floor, so results below render/ can show themselves."""

from __future__ import annotations

import base64
import html
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = ["esc", "html_fmt", "html_table", "html_kv", "html_note", "html_img", "html_tok", "html_neuron"]

esc = html.escape

def html_fmt(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else fmt.format(x)
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) for v in x) and len(x) <= 4:
        return "[" + ", ".join(html_fmt(v, fmt) for v in x) + "]"
    return esc(str(x))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[bool] | None = None) -> str:
    """Cells are HTML already (escape before); ``num`` marks right-aligned columns."""
    num = num or [False] * len(header)
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if n else ""}>{c}</td>' for c, n in zip(r, num)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_kv(pairs: Sequence[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def html_note(text: str) -> str:
    return f'<div class="note">{text}</div>'


def html_img(png: bytes, alt: str) -> str:
    return f'<img class="fig" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_GLYPHS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def html_tok(s: str) -> str:
    """A token as a chip, its whitespace made visible (" the" and "the" are different tokens); long runs of one
    whitespace character are counted ("␣×24") so an indentation token stays one chip wide."""
    shown = []
    for ch in s:
        if ch in _GLYPHS:
            shown.append(_GLYPHS[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            shown.append(f"\\u{ord(ch):04x}")
        else:
            shown.append(ch)
    text = re.sub(r"([␣↵⇥␍])\1{3,}", lambda m: f"{m.group(1)}×{len(m.group(0))}", "".join(shown))
    if len(text) > 24:
        text = text[:22] + "…"
    return f'<code class="tok">{esc(text) if text else "∅"}</code>'


def html_neuron(layer: int, n: int) -> str:
    return f"L{layer}.N{n}"
