"""Proxy tasks: turn a query into |Q| prompts and the target token ids (METHOD section 1).

- ``mcqa-letter`` (the paper's): the question with shuffled lettered options; the target is the correct
  letter as the model would emit it after the prompt (``" A"`` for BPE vocabularies; ``letter_style="bare"``
  gives the authors' bare ``"A"`` piece). It must be one token.
- ``mcqa-text``: the question (options listed or not), then the correct option's text is the target.
- ``cloze``: a fact prefix; the target is the answer's tokens. A ``[Y]`` slot marks where the answer goes
  (mLAMA style); the prompt is the text before it, and a slot glued to that text takes no space (zh, ja).

Distractors come from the answers of other queries of the same group (seeded). Each of the |Q| prompts uses
its own template, its own option order and its own k in-context examples (filled-in queries of the same
group, never one with the query's own answer). Raw text is the default; ``chat_template=True`` wraps the
prompt as a user turn. Nothing here touches the global RNG: every draw uses ``random.Random`` seeded from
(seed, query id, prompt index).

Example:
    >>> cfg = ProxyConfig("cloze", n_shots=2)
    >>> prompts = build_prompts(queries[0], cfg, tokenizer, pool=queries)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from ..config import Config
from ..errors import ProxyError
from .queries import SLOT, Query, groups_of

__all__ = [
    "PROXIES",
    "letter_tokens",
    "cloze_chance",
    "DEFAULT_SHOTS",
    "Template",
    "ProxyConfig",
    "Prompt",
    "as_prompt",
    "as_prompts",
    "token_ids",
    "TEMPLATES",
    "build_prompts",
    "build_all_prompts",
    "encode",
    "tokenizer_identity",
]

ProxyKind = Literal["mcqa-letter", "mcqa-text", "cloze"]
LetterStyle = Literal["space", "bare"]
PROXIES: tuple[str, ...] = get_args(ProxyKind)

# k in-context examples by default, chosen from measurements on SmolLM2-135M with the built-in sets
# (`qrnca-lens accuracy`, README): cloze top-1 0.53 zero-shot -> 0.77 with 4 facts; letter MCQA stays near
# chance (0.23 -> 0.29 with 3 examples, which at least teach the letter format: mean p 0.02 -> 0.25);
# answer-text MCQA is best zero-shot (0.37 vs 0.32 with 3).
DEFAULT_SHOTS = {"mcqa-letter": 3, "mcqa-text": 0, "cloze": 4}


@dataclass(frozen=True)
class Template(Config):
    """``instruction`` + k filled-in ``item``s (each followed by its answer) + the query's ``item``.

    ``item`` fields: ``{question}`` and ``{options}`` (MCQA; options rendered with ``option_format`` joined
    by ``option_sep``, then ``options_end``; empty when options are hidden), or ``{fact}`` (cloze: the fact up
    to the answer slot).
    """

    instruction: str
    item: str
    option_format: str = "{letter}. {text}"
    option_sep: str = "\n"
    example_sep: str = "\n\n"
    options_end: str = ""


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "mcqa-letter": (
        Template(
            "The following are multiple choice questions. Answer with the letter of the correct option.\n\n",
            "Question: {question}\n{options}\nAnswer:",
        ),
        Template(
            "Pick the right answer to each question and reply with its letter only.\n\n",
            "{question}\n{options}\nThe correct option is",
            option_format="({letter}) {text}",
        ),
        Template(
            "",
            "Q: {question}\nChoices: {options}\nA:",
            option_format="{letter}) {text}",
            option_sep="  ",
        ),
    ),
    "mcqa-text": (
        Template("Answer each question.\n\n", "Question: {question}\n{options}Answer:", option_format="- {text}\n", option_sep=""),
        Template("", "Q: {question}\n{options}A:", option_format="{text}", option_sep=" / ", options_end="\n"),
        Template("Short answers only.\n\n", "{question}\n{options}The answer is", option_format="* {text}\n", option_sep=""),
    ),
    "cloze": (
        Template("", "{fact}", example_sep="\n"),
        Template("Complete each sentence with the correct word.\n\n", "{fact}", example_sep="\n"),
        Template("Facts:\n", "- {fact}", example_sep="\n"),
    ),
}


@dataclass(frozen=True)
class ProxyConfig(Config):
    """How queries become prompts. ``n_shots=None`` takes ``DEFAULT_SHOTS[kind]``.

    ``prepend_bos=None`` follows the model (``models.default_prepend_bos``); the resolved value is recorded
    in every result.

    Example:
        >>> cfg = ProxyConfig("cloze", n_prompts=2)
        >>> cfg.shots, len(cfg.template_list()) >= cfg.n_prompts
        (4, True)
        >>> ProxyConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    kind: ProxyKind = field(default="mcqa-letter", metadata={"help": "the proxy task"})
    n_prompts: int = field(default=3, metadata={"help": "|Q|: prompts (templates) per query"})
    n_shots: int | None = field(default=None, metadata={"help": "in-context examples per prompt (default: per proxy)"})
    n_options: int = 4
    letters: str = "ABCDEFGHIJ"
    letter_style: LetterStyle = "space"
    show_options: bool = True
    chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the model's chat template"})
    prepend_bos: bool | None = field(
        default=None, metadata={"help": "prepend BOS: auto follows the model's own tokenizer"})
    templates: tuple[Template, ...] | None = None
    seed: int = field(default=0, metadata={"help": "seed of options order, examples and distractors"})

    def validate(self) -> None:
        if self.kind not in PROXIES:
            raise ProxyError(f"unknown proxy {self.kind!r}; choose one of {list(PROXIES)}")
        if self.n_prompts < 1:
            raise ProxyError(f"n_prompts (|Q|) must be at least 1, got {self.n_prompts}")
        if self.n_shots is not None and self.n_shots < 0:
            raise ProxyError(f"n_shots must be >= 0, got {self.n_shots}")
        if not 2 <= self.n_options <= len(self.letters):
            raise ProxyError(f"n_options must be between 2 and {len(self.letters)}, got {self.n_options}")
        if self.letter_style not in get_args(LetterStyle):
            raise ProxyError(f"letter_style must be 'space' or 'bare', got {self.letter_style!r}")
        if self.templates is not None and not self.templates:
            raise ProxyError("templates, when given, must hold at least one Template")

    @property
    def shots(self) -> int:
        return DEFAULT_SHOTS[self.kind] if self.n_shots is None else self.n_shots

    def template_list(self) -> tuple[Template, ...]:
        return self.templates if self.templates is not None else TEMPLATES[self.kind]

    def with_(self, **changes: Any) -> "ProxyConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class Prompt(Config):
    """One prompt of a query: its tokens, the target continuation and (MCQA) every option's continuation.

    ``options[correct]`` equals ``target``. For cloze ``options`` is None and prediction is the top-1 token.

    Example:
        >>> p = Prompt(query_id="q1", group="g", template=0, text="2 + 2 =", tokens=(17, 16, 17), target=(19,))
        >>> p.target_position
        2
    """

    query_id: str
    group: str
    template: int  # index of the template used
    text: str
    tokens: tuple[int, ...]
    target: tuple[int, ...]
    options: tuple[tuple[int, ...], ...] | None = None
    correct: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    index: int = 0  # position among the query's prompts
    examples: tuple[str, ...] = ()  # ids of the in-context examples, in prompt order
    # Cloze only: the continuation tokens of the distractors an MCQA proxy would draw from the same pool
    # (neuron-based prediction ranks them against the target); None when the group has too few answers.
    distractors: tuple[tuple[int, ...], ...] | None = None

    def validate(self) -> None:
        # Caught here, not downstream: an empty target fails deep inside the model on the fast IG path and
        # silently scores every neuron 0 on the reference path.
        if not self.tokens:
            raise ProxyError(f"prompt of query {self.query_id!r} has no tokens: there is no target position to "
                             "score; give it a non-empty text")
        if not self.target:
            raise ProxyError(f"prompt of query {self.query_id!r} has no target token to score: give it a "
                             "non-empty target (the answer's tokens)")

    @property
    def target_position(self) -> int:
        """The last prompt position, where the first target token is predicted."""
        return len(self.tokens) - 1

    # to_dict / from_dict: the base's. What a run stores (lists for the token tuples, null for no options),
    # so later stages read the very prompts that were attributed; tests/test_config.py pins the format.

    @classmethod
    def from_text(cls, source: Any, text: str, target: Any, *, prepend_bos: bool | None = None,
                  query_id: str = "prompt", group: str = "prompt") -> Prompt:
        """A prompt from its text and the answer to score, tokenised as ``build_prompts`` tokenises its prompts.

        Args:
            source: the model (its tokenizer and its default BOS handling, as ``locate`` uses) or a tokenizer
                (then no BOS unless ``prepend_bos=True``, as ``build_prompts``' default).
            text: the prompt; the target is predicted right after its last token.
            target: the answer's text as it follows the prompt (``" Paris"``, with its leading space), tokenised
                after the prompt text without another BOS; or its token ids.
            prepend_bos: the BOS choice instead of the source's default.
            query_id, group: the names that messages and results give this prompt.

        Returns:
            The ``Prompt``; ``ProxyError`` when the target merges with the prompt's last token.

        Example:
            >>> p = Prompt.from_text(model, "The capital of France is", " Paris")   # doctest: +SKIP
            >>> p.target == tuple(model.tokenizer(" Paris", add_special_tokens=False)["input_ids"])  # doctest: +SKIP
            True
        """
        tokenizer, bos = _tokenizer_and_bos(source, prepend_bos)
        ids = encode(tokenizer, text, prepend_bos=bos)
        if not ids:
            raise ProxyError(f"the prompt text {text!r} has no tokens: give a non-empty text")
        # The answer's tokens as the model would emit them after this text: build_prompts' own path.
        tgt = _continuation(tokenizer, ids, text, target, bos) if isinstance(target, str) else token_ids(target, "target")
        return cls(query_id, group, 0, text, tuple(ids), tgt, meta={"prepend_bos": bos})

    @classmethod
    def from_tokens(cls, tokens: Any, target: Any, *, tokenizer: Any = None, text: str | None = None,
                    query_id: str = "prompt", group: str = "prompt") -> Prompt:
        """A prompt from token ids you already hold (``model.to_tokens(...)``): taken as they are, BOS or not.

        Args:
            tokens: the prompt's ids: a list of ints, or a 1-D / ``[1, seq]`` integer tensor or array.
            target: the answer's token ids (an int, a list, a tensor), or its text (``" Paris"``, tokenised on its
                own without BOS: that needs ``tokenizer``).
            tokenizer: to tokenise a text target, and to decode ``tokens`` into ``text``.
            text: the prompt's text for display (default: the decoded tokens, or "" without a tokenizer).
            query_id, group: the names that messages and results give this prompt.

        Returns:
            The ``Prompt``.

        Example:
            >>> p = Prompt.from_tokens([[1, 17, 16]], [19, 20])
            >>> p.tokens, p.target, p.target_position
            ((1, 17, 16), (19, 20), 2)
        """
        ids = token_ids(tokens, "tokens")
        if isinstance(target, str):
            if tokenizer is None:
                raise ProxyError("a text target needs the tokenizer: Prompt.from_tokens(tokens, target, "
                                 "tokenizer=model.tokenizer), or give the target's token ids")
            tgt = tuple(encode(tokenizer, target, prepend_bos=False))
        else:
            tgt = token_ids(target, "target")
        if text is None:
            text = str(tokenizer.decode(list(ids))) if tokenizer is not None else ""
        return cls(query_id, group, 0, text, ids, tgt, meta={"from_tokens": True})


def token_ids(value: Any, what: str = "tokens") -> tuple[int, ...]:
    """Token ids as a tuple of ints, from an int, a list of ints (or one such row) or a 1-D / ``[1, n]`` tensor.

    Args:
        value: the ids.
        what: their name in the one-line ``ProxyError`` for anything else (floats, bools, a batch of rows).

    Returns:
        The ids.

    Example:
        >>> token_ids([[5, 6]]), token_ids(7)
        ((5, 6), (7,))
    """
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "tolist"):  # a tensor or an array, checked without importing torch
        dtype = str(getattr(value, "dtype", ""))
        if "int" not in dtype:
            raise ProxyError(f"{what} must hold integer token ids, got a tensor of {dtype.replace('torch.', '')}")
        if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
            raise ProxyError(f"{what} must be 1-D or [1, seq] (one prompt), got shape {list(shape)}; pass several "
                             "prompts as a list")
        value = value.tolist()
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ProxyError(f"{what} must be token ids (ints), got {type(value).__name__} {value!r}")
    if _is_id(value):
        return (operator.index(value),)
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]  # one row: [[...]]
    if not isinstance(value, (list, tuple)) or not all(_is_id(v) for v in value):
        raise ProxyError(f"{what} must be token ids: an int, a list of ints, or a 1-D / [1, seq] integer tensor; got "
                         f"{type(value).__name__} {str(value)[:40]}")
    return tuple(operator.index(v) for v in value)


def _is_id(v: Any) -> bool:
    """An integer of any kind (Python, numpy), but not a bool and not a float."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _tokenizer_and_bos(source: Any, prepend_bos: bool | None) -> tuple[Any, bool]:
    """A model's tokenizer and its default BOS choice, or a bare tokenizer's (no BOS, as ``build_prompts``)."""
    if hasattr(source, "cfg"):  # a model
        from ..model.access import default_prepend_bos, tokenizer_of

        return tokenizer_of(source), default_prepend_bos(source) if prepend_bos is None else prepend_bos
    if not callable(source):
        raise ProxyError(f"a text prompt needs the model or its tokenizer to tokenise it, got {type(source).__name__}")
    return source, bool(prepend_bos)


_MISSING_TARGET = ("{kind} prompt needs the answer it is scored on: pass target=\" Paris\" (the answer's text as it "
                   "follows the prompt) or target=[token ids]")
_PROMPT_KINDS = "a Prompt, a text (with target=), or token ids (a list of ints or a 1-D / [1, seq] tensor, with target=)"


def as_prompt(source: Any, prompt: Any, target: Any = None) -> Prompt:
    """One prompt from what a user holds: a ``Prompt``, a text with its target, or token ids with their target.

    What ``attribute_prompt`` calls on its input. Text goes through ``Prompt.from_text`` (the model's default
    BOS), ids through ``Prompt.from_tokens`` (taken as they are).

    Args:
        source: the model (or a tokenizer), to tokenise text and check token ids against its vocabulary.
        prompt: a ``Prompt``; a string; or token ids (a list of ints, a 1-D or ``[1, seq]`` tensor).
        target: the answer, for a string or ids: its text (``" Paris"``) or its token ids; None for a ``Prompt``,
            which holds its own.

    Returns:
        The ``Prompt``; a ``ProxyError`` in one line for a missing target, a target given to a ``Prompt``, or an
        input of another kind.

    Example:
        >>> as_prompt(None, [3, 4, 5], target=[6]).target
        (6,)
        >>> as_prompt(None, [3, 4, 5])
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.ProxyError: a token prompt needs the answer it is scored on: pass target=" Paris" ...
    """
    if isinstance(prompt, Prompt):
        if target is not None:
            raise ProxyError(f"the Prompt of query {prompt.query_id!r} holds its own target; drop target=, or pass "
                             "the prompt's text or tokens instead")
        return prompt
    if isinstance(prompt, str):
        if target is None:
            raise ProxyError(_MISSING_TARGET.format(kind="a text"))
        return Prompt.from_text(source, prompt, target)
    if isinstance(prompt, (list, tuple)) or (hasattr(prompt, "shape") and hasattr(prompt, "tolist")):
        if target is None:
            raise ProxyError(_MISSING_TARGET.format(kind="a token"))
        tokenizer = getattr(source, "tokenizer", None) if hasattr(source, "cfg") else source
        p = Prompt.from_tokens(prompt, target, tokenizer=tokenizer)
        # Caught here, not as an IndexError inside the embedding.
        vocab = int(getattr(getattr(source, "cfg", None), "d_vocab", None) or 0)
        bad = [t for t in (*p.tokens, *p.target) if vocab and not 0 <= t < vocab]
        if bad:
            raise ProxyError(f"token ids {bad[:3]} are outside the model's vocabulary (0..{vocab - 1})")
        return p
    raise ProxyError(f"got {type(prompt).__name__} as a prompt; give {_PROMPT_KINDS}")


def as_prompts(source: Any, prompts: Any, targets: Any = None) -> list[Prompt]:
    """Several prompts from what a user holds: a list of what ``as_prompt`` takes, or a ``[n, seq]`` tensor.

    Args:
        source: the model (or a tokenizer).
        prompts: a list of ``Prompt``s, strings and token-id lists (mixed freely), or a 2-D integer tensor.
        targets: None when every prompt is a ``Prompt``; one string (or one token id) for all; or a list with
            one entry per prompt (a string, token ids, or None for a ``Prompt``).

    Returns:
        The ``Prompt``s in order; a ``ProxyError`` in one line naming the bad entry.

    Example:
        >>> [p.target for p in as_prompts(None, [[3, 4], [5, 6, 7]], targets=[[8], [9, 10]])]
        [(8,), (9, 10)]
    """
    if isinstance(prompts, (str, Prompt)):
        raise ProxyError("attribute_prompts takes a list of prompts; for one, use attribute_prompt or pass [prompt]")
    shape = getattr(prompts, "shape", None)
    if shape is not None and hasattr(prompts, "tolist"):
        if len(shape) != 2:
            raise ProxyError(f"a tensor of prompts must be [n_prompts, seq], got shape {list(shape)}; for one "
                             "prompt's tokens use attribute_prompt")
        prompts = [row for row in prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ProxyError(f"prompts must be a list, got {type(prompts).__name__}; each entry {_PROMPT_KINDS}")
    if prompts and all(isinstance(x, int) and not isinstance(x, bool) for x in prompts):
        raise ProxyError("attribute_prompts takes a list of prompts, got one list of token ids; use attribute_prompt "
                         "for one prompt, or pass [tokens]")
    if targets is None or isinstance(targets, (str, int)):  # one text or one token id: the same for all
        per: list[Any] = [None if isinstance(p, Prompt) else targets for p in prompts]
    else:
        if not isinstance(targets, (list, tuple)) and not hasattr(targets, "tolist"):
            raise ProxyError(f"targets must be one string for all prompts or a list with one entry per prompt, got "
                             f"{type(targets).__name__}")
        per = list(targets.tolist() if hasattr(targets, "tolist") else targets)
        if len(per) != len(prompts):
            raise ProxyError(f"targets has {len(per)} entries for {len(prompts)} prompts: give one per prompt "
                             "(None for a Prompt), or one string for all")
    out = []
    for i, (p, t) in enumerate(zip(prompts, per)):
        try:
            out.append(as_prompt(source, p, t))
        except ProxyError as e:
            raise ProxyError(f"prompts[{i}]: {e}") from None
    return out


# ---------------------------------------------------------------- tokenisation


def encode(tokenizer: Any, text: str, *, prepend_bos: bool) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ProxyError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False")
        ids = [tokenizer.bos_token_id] + ids
    return ids


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Which tokenizer made a prompt's ids: its name, size and a SHA-256 of its vocabulary (token -> id)."""
    vocab = tokenizer.get_vocab()
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""), "vocab_size": len(vocab),
            "vocab_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _continuation(tokenizer: Any, prompt_ids: list[int], text: str, continuation: str, bos: bool) -> tuple[int, ...]:
    """The tokens the model would emit after ``text`` to produce ``continuation``."""
    full = encode(tokenizer, text + continuation, prepend_bos=bos)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ProxyError(
            f"the prompt's tokens change when {continuation!r} follows it (a token merges across the boundary); "
            "end the template differently (e.g. with ':' ) so the answer starts a new token"
        )
    out = tuple(full[len(prompt_ids):])
    if not out:
        raise ProxyError(f"the answer {continuation!r} has no tokens")
    return out


def cloze_chance(prompt: Prompt, others: Sequence[Query], tokenizer: Any, bos: bool) -> float | None:
    """How often guessing is right on a cloze prompt: the share of ``others`` whose answer starts with its target token.

    Cloze accuracy is top-1 of the answer's first token. A model that knows the relation but not the fact, and
    answers with a random answer of the group, is right when that answer starts with the same token: often
    for answers that repeat (continents) or share a first piece (a byte-level tokenizer's first byte of
    Cyrillic or CJK). This is that rate, each other answer tokenised after this prompt as the proxy does.

    Args:
        prompt: a cloze prompt.
        others: the group's other queries (the pool's, without the prompt's own).
        tokenizer: the prompt's tokenizer.
        bos: whether the prompt starts with BOS.

    Returns:
        The share in [0, 1]; None if no other answer can follow the prompt as one token sequence.

    Example:
        >>> cloze_chance(p, [q for q in pool if q.group == p.group and q.id != p.query_id], tok, True)  # doctest: +SKIP
        0.05
    """
    hits = []
    for o in others:
        try:
            first = _continuation(tokenizer, list(prompt.tokens), prompt.text, o.answer_sep + o.answer, bos)[0]
        except ProxyError:
            continue  # this answer merges with the prompt's end: not one the model could be asked for here
        hits.append(first == prompt.target[0])
    return sum(hits) / len(hits) if hits else None


# ---------------------------------------------------------------- building prompts


def _rng(seed: int, *parts: Any) -> random.Random:
    return random.Random("|".join(str(p) for p in (seed, *parts)))


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _fact_prefix(q: Query) -> str:
    if SLOT not in q.question:
        return q.question.rstrip()
    prefix = q.question.split(SLOT, 1)[0].rstrip()
    if not prefix:
        raise ProxyError(f"query {q.id!r}: the answer slot [Y] starts the sentence, so no prompt ends before it")
    return prefix


def _filled_fact(q: Query) -> str:
    if SLOT in q.question:
        text = q.question.replace(SLOT, q.answer)
        return " ".join(text.split()).replace(" .", ".")
    return f"{q.question.rstrip()} {q.answer}."


def _options_for(q: Query, pool_group: Sequence[Query], cfg: ProxyConfig, avoid: str | None = None) -> list[str]:
    """The query's options (its own, or the answer plus distractors from the group), unshuffled.

    ``avoid`` (the answer of the query an example is shown for) is kept out of the distractors, so an example
    does not hint at the real query's answer, unless the group is too small to do without it.
    """
    if q.options is not None:
        if len(q.options) > len(cfg.letters):
            raise ProxyError(f"query {q.id!r} has {len(q.options)} options but only {len(cfg.letters)} letters")
        return list(q.options)
    seen = {_norm(q.answer)}
    candidates = []
    for other in pool_group:
        key = _norm(other.answer)
        if key not in seen:
            seen.add(key)
            candidates.append(other.answer)
    need = cfg.n_options - 1
    if avoid is not None:
        kept = [c for c in candidates if _norm(c) != _norm(avoid)]
        if len(kept) >= need:
            candidates = kept
    if len(candidates) < need:
        raise ProxyError(
            f"group {q.group!r} has only {len(candidates)} answers other than {q.answer!r}, not enough for "
            f"{need} distractors; add queries to the group, take distractors from a larger set (--pool PATH, "
            "pool= in Python), lower n_options, or give the query its own options"
        )
    distractors = _rng(cfg.seed, q.id, "distractors").sample(sorted(candidates), need)
    return [q.answer] + distractors


def _shuffled(options: list[str], answer: str, rng: random.Random) -> tuple[list[str], int]:
    order = options[:]
    rng.shuffle(order)
    return order, order.index(answer)


def _render_item(t: Template, cfg: ProxyConfig, q: Query, options: list[str] | None) -> str:
    if cfg.kind == "cloze":
        return t.item.format(fact=_fact_prefix(q))
    rendered = ""
    if options is not None and (cfg.kind == "mcqa-letter" or cfg.show_options):
        rendered = t.option_sep.join(
            t.option_format.format(letter=cfg.letters[i], text=o) for i, o in enumerate(options)
        ) + t.options_end
    return t.item.format(question=_mcqa_stem(q), options=rendered)


def _mcqa_stem(q: Query) -> str:
    """An MCQA question stem: a cloze slot becomes a blank ("The capital of Italy is ___.")."""
    if SLOT not in q.question:
        return q.question
    return " ".join(q.question.replace(SLOT, "___").split()).replace(" .", ".")


def _answer_text(cfg: ProxyConfig, q: Query, options: list[str] | None, correct: int | None, sep: str) -> str:
    if cfg.kind == "mcqa-letter":
        assert correct is not None
        return (sep if cfg.letter_style == "space" else "") + cfg.letters[correct]
    return sep + q.answer


def _examples(q: Query, group: Sequence[Query], k: int, cfg: ProxyConfig, j: int) -> list[Query]:
    if k == 0:
        return []
    allowed = [o for o in group if o.id != q.id and _norm(o.answer) != _norm(q.answer)]
    if len(allowed) < k:
        raise ProxyError(
            f"query {q.id!r}: group {q.group!r} has {len(allowed)} usable in-context examples, fewer than "
            f"n_shots={k}; take examples from a larger set (--pool PATH, pool= in Python), add queries to the "
            "group, or lower n_shots"
        )
    return _rng(cfg.seed, q.id, j, "examples").sample(allowed, k)


def build_prompts(
    query: Query,
    cfg: ProxyConfig,
    tokenizer: Any,
    *,
    pool: Sequence[Query] | None = None,
    prepend_bos: bool = False,
) -> list[Prompt]:
    """Build the |Q| prompts of ``query``: templates, shuffled options and in-context examples, seeded.

    Args:
        query: the query.
        cfg: the proxy (kind, |Q|, shots, seed).
        tokenizer: the model's tokenizer (``model.tokenizer``).
        pool: where distractors and examples come from (default: the query alone); a run passes its data set.
        prepend_bos: the resolved BOS choice (``cfg.prepend_bos`` wins when it is set).

    Returns:
        ``cfg.n_prompts`` ``Prompt``s (a query with pre-built prompts: those), with tokens, target tokens and,
        for MCQA, every option's tokens.

    Example:
        >>> from qrnca_lens import load_data
        >>> pool = load_data("builtin:facts")
        >>> prompts = build_prompts(pool[0], ProxyConfig("cloze"), model.tokenizer, pool=pool)  # doctest: +SKIP
        >>> len(prompts), prompts[0].text.endswith("The capital city of France is")          # doctest: +SKIP
        (3, True)
    """
    bos = cfg.prepend_bos if cfg.prepend_bos is not None else prepend_bos
    if cfg.chat_template:
        bos = False  # the chat template carries its own start tokens
    if query.prompts is not None:
        return _prebuilt_prompts(query, cfg, tokenizer, bos)
    group = [o for o in (pool or [query]) if o.group == query.group]
    templates = cfg.template_list()
    out = []
    for j in range(cfg.n_prompts):
        t = templates[j % len(templates)]
        rng = _rng(cfg.seed, query.id, j, "order")
        options: list[str] | None = None
        correct: int | None = None
        if cfg.kind != "cloze":
            options, correct = _shuffled(_options_for(query, group, cfg), query.answer, rng)
        parts = [t.instruction]
        examples = _examples(query, group, cfg.shots, cfg, j)
        for ex in examples:
            ex_opts, ex_correct = (None, None)
            if cfg.kind != "cloze":
                ex_opts, ex_correct = _shuffled(_options_for(ex, group, cfg, avoid=query.answer), ex.answer,
                                              _rng(cfg.seed, ex.id, query.id, j))
            if cfg.kind == "cloze":
                item = t.item.format(fact=_filled_fact(ex))
            else:
                item = _render_item(t, cfg, ex, ex_opts) + _answer_text(cfg, ex, ex_opts, ex_correct, " ")
            parts.append(item + t.example_sep)
        body = "".join(parts) + _render_item(t, cfg, query, options)
        sep = query.answer_sep if cfg.kind == "cloze" else " "
        if cfg.chat_template:
            body = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
            sep = ""
        ids = encode(tokenizer, body, prepend_bos=bos)
        if cfg.kind == "mcqa-letter":
            assert options is not None
            assert correct is not None
            opt_tokens = tuple(letter_tokens(tokenizer, ids, body, cfg, i, sep, bos) for i in range(len(options)))
            target = opt_tokens[correct]
        elif cfg.kind == "mcqa-text":
            assert options is not None
            assert correct is not None
            opt_tokens = tuple(_continuation(tokenizer, ids, body, sep + o, bos) for o in options)
            target = opt_tokens[correct]
        else:
            opt_tokens = None
            target = _continuation(tokenizer, ids, body, sep + query.answer, bos)
        distractors = _cloze_distractors(query, group, cfg, tokenizer, ids, body, sep, bos) if cfg.kind == "cloze" else None
        out.append(Prompt(query.id, query.group, j % len(templates), body, tuple(ids), target, opt_tokens, correct,
                          meta={"options": options, "prepend_bos": bos}, index=j,
                          examples=tuple(ex.id for ex in examples), distractors=distractors))
    return out


def _cloze_distractors(query: Query, group: Sequence[Query], cfg: ProxyConfig, tokenizer: Any, ids: list[int],
                       body: str, sep: str, bos: bool) -> tuple[tuple[int, ...], ...] | None:
    """The tokens of the distractors an MCQA proxy would draw for a cloze query, or None if there are too few.

    Drawn here, from the pool the prompt was built with, so a run stores them and neuron-based prediction
    never re-draws them from another pool.
    """
    try:
        others = [o for o in _options_for(query, group, cfg) if o != query.answer]
        return tuple(_continuation(tokenizer, ids, body, sep + o, bos) for o in others)
    except ProxyError:
        return None  # only neuron-based prediction needs them; it says so when they are missing


def letter_tokens(tokenizer: Any, ids: list[int], body: str, cfg: ProxyConfig, i: int, sep: str, bos: bool) -> tuple[int, ...]:
    """The single token of option letter ``i`` as the model would emit it after ``body`` (tokens ``ids``).

    Args:
        tokenizer: the prompts' tokenizer.
        ids, body: the prompt's tokens and text (the letter's tokenisation can depend on what precedes it).
        cfg: the proxy config (``letters``, ``letter_style``).
        i: the option's index.
        sep, bos: the separator before the letter, and whether the prompt starts with BOS.

    Returns:
        A one-token tuple; a letter that is not one token raises ``ProxyError`` naming the fix.

    Example:
        >>> letter_tokens(tok, list(p.tokens), p.text, ProxyConfig("mcqa-letter"), 0, " ", True)  # doctest: +SKIP
        (330,)
    """
    letter = cfg.letters[i]
    if cfg.letter_style == "bare":
        tid = tokenizer.convert_tokens_to_ids(letter)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ProxyError(f"the letter {letter!r} is not a token of this vocabulary; use letter_style='space'")
        return (int(tid),)
    toks = _continuation(tokenizer, ids, body, sep + letter, bos)
    if len(toks) != 1:
        raise ProxyError(
            f"the option letter {sep + letter!r} is {len(toks)} tokens for this tokenizer, but mcqa-letter needs a "
            "single token; use letter_style='bare' or other letters (ProxyConfig(letters=...))"
        )
    return toks


def _prebuilt_prompts(query: Query, cfg: ProxyConfig, tokenizer: Any, bos: bool) -> list[Prompt]:
    """Authors' prompts: used as they are; the target is the given letter (letters A.. as options)."""
    if cfg.kind != "mcqa-letter":
        raise ProxyError(f"query {query.id!r} holds pre-built letter prompts; use the 'mcqa-letter' proxy")
    assert query.prompts is not None and query.prompt_letters is not None
    out = []
    for j, (text, letter) in enumerate(zip(query.prompts, query.prompt_letters)):
        if len(letter) != 1 or letter not in cfg.letters[: cfg.n_options]:
            raise ProxyError(f"query {query.id!r}: answer letter {letter!r} is not among {cfg.letters[:cfg.n_options]!r}")
        # A prompt that ends in a space leaves the letter as a bare piece; fold the space into the letter.
        body = text.rstrip(" ") if cfg.letter_style == "space" else text
        ids = encode(tokenizer, body, prepend_bos=bos)
        opt_tokens = tuple(letter_tokens(tokenizer, ids, body, cfg, i, " ", bos) for i in range(cfg.n_options))
        correct = cfg.letters.index(letter)
        out.append(Prompt(query.id, query.group, 0, body, tuple(ids), opt_tokens[correct], opt_tokens, correct,
                          meta={"prepend_bos": bos, "prebuilt": True}, index=j))
    return out


def build_all_prompts(
    queries: Sequence[Query], cfg: ProxyConfig, tokenizer: Any, *, prepend_bos: bool = False,
    pool: Sequence[Query] | None = None,
) -> dict[str, list[Prompt]]:
    """Prompts for every query, keyed by query id; the pool defaults to ``queries`` themselves."""
    pool = list(pool if pool is not None else queries)
    by_group = groups_of(pool)
    return {q.id: build_prompts(q, cfg, tokenizer, pool=by_group.get(q.group, [q]), prepend_bos=prepend_bos) for q in queries}
