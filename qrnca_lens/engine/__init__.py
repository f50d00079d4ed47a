"""The row engine: every model pass that intervenes at a prompt's last position runs here.

An intervention at the last prompt position (scaling neurons there, or writing IG's scaled activation)
leaves every earlier position identical to the clean run in every layer, because attention is causal. So:

1. **One prefix pass** per group of prompts fills a key/value cache and records the clean values callers
   ask for (e.g. ``hook_pre_linear`` at each last position: IG's f̄).
2. **Rows.** A row is short: the prompt's last token plus teacher-forced continuation tokens (a target's
   first tokens, or a candidate answer). Each row carries its own intervention (``Row.scale``: neurons and
   factors at its first token, or IG's leaf writes) and attends to its prompt's cached prefix. Any number
   of rows, of any prompts of the group, share one forward.
3. **Rows start at the lowest layer they change.** Below it a row is the clean run, so it starts from the
   clean residual (``blocks.l.hook_resid_pre`` of its tokens, recorded from the clean row once) and the
   blocks below are not run at all.

Backends (the ``Backend`` literal; ``backend_of`` gives a model's own, ``choose_backend`` maps a fast/full choice):

- ``"packed"``, a TL 4.x ``TransformerBridge`` over a transformers model: the group's prefixes are
  concatenated along the sequence of one cache; rows follow along the sequence, each seeing its own
  prompt's prefix span and its own earlier tokens through a 4D mask (sliding-window layers get their own
  mask), at explicit position ids. Blocks below a chunk's start are skipped by ``skip_blocks`` (the hook
  door), the residual enters as ``inputs_embeds``. TL's own ``start_at_layer`` is not used: on a bridge it
  still runs the lower blocks and discards them.
- ``"batch"``, a TL 3.x ``HookedTransformer``: rows of one prompt and length along the batch, the prompt's
  frozen cache broadcast to them, ``start_at_layer`` (which really skips there).
- ``"full"``, anything else: each row is a full sequence (prompt + row), exact and slow.

Exactness is checked, not assumed: per model, a clean row started at the top layer must equal the same row
started at layer 0 (else rows always start at 0: GPT-2 adds position embeddings to ``inputs_embeds``, for
instance), and each group's first prompt must equal a plain forward (else ``FastPathError``).

Example:
    >>> rows = [Row(0, (tok_last,)), Row(0, (tok_last,), scale=((14, (103, 7), 2.0),))]   # doctest: +SKIP
    >>> out = run_rows(model, [prompt_tokens], rows, lambda row, lp, acts: float(lp[0, target]))  # doctest: +SKIP
"""

from .checks import CleanRowCheck, check_against_plain, skipping_is_exact
from .plan import DEFAULT_MAX_PREFIX_TOKENS, DEFAULT_MEMORY_BUDGET_MB
from .prefix import Backend, Prefix, Row, Scale, backend_of, choose_backend
from .run import Reduce, plan_row_chunks, run_rows

__all__ = ["Row", "Scale", "Prefix", "Backend", "run_rows", "Reduce", "plan_row_chunks", "backend_of", "choose_backend",
           "skipping_is_exact", "check_against_plain", "CleanRowCheck", "DEFAULT_MEMORY_BUDGET_MB",
           "DEFAULT_MAX_PREFIX_TOKENS"]
