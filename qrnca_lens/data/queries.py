"""Queries and the loaders that read them. Pure Python: no torch, no model.

A ``Query`` is one question (or cloze fact) with one correct answer, in a group (domain, relation or
language). Formats read by ``load_data(spec)``, where ``spec`` is a path or ``builtin:NAME``:

- our JSONL: one object a line with ``id``, ``group``, ``question``, ``answer``, optional ``options`` (a
  list that includes the answer), ``language``, ``relation``, ``subject`` (``language`` and ``relation`` let a run
  be mapped by either, whatever its ``group``);
- mLAMA-style facts (JSONL with ``subject``, ``relation``, ``object`` and a ``template`` holding ``[X]`` and
  ``[Y]``): the cloze ``question`` is the template with the subject filled in and ``[Y]`` kept;
- MMLU CSV rows ``question,A,B,C,D,answer`` (the group is the file name without ``_test``/``_dev``/``_val``);
- the QRNCA authors' pre-built JSON ``{id: {"sentences": [...], "obj_label": [...], "relation_name": g}}``:
  complete prompts that end right before the answer letter, kept as they are.

Example:
    >>> qs = load_data("builtin:facts")
    >>> qs[0].group, qs[0].answer
    ('capital', 'Paris')
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DataError

__all__ = [
    "Query",
    "QueriesLike",
    "as_queries",
    "load_data",
    "load_jsonl",
    "load_mlama",
    "load_mmlu_csv",
    "load_authors_json",
    "builtin_names",
    "groups_of",
    "limit_per_group",
]

BUILTIN = ("domains", "facts", "languages")
SLOT = "[Y]"


@dataclass(frozen=True)
class Query(Config):
    """One query. ``prompts``/``prompt_letters`` hold pre-built prompts (authors' format) when given.

    Example:
        >>> q = Query(id="q1", group="math", question="2 + 2 =", answer="4", options=("3", "4"))
        >>> q.to_dict()
        {'id': 'q1', 'group': 'math', 'question': '2 + 2 =', 'answer': '4', 'options': ['3', '4']}
        >>> Query(id="q2", group="math", question="1 + 1 =", answer="2", options=("3", "4"))
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.DataError: query 'q2': the answer '2' is not among the options ['3', '4']
    """

    id: str
    group: str
    question: str
    answer: str
    options: tuple[str, ...] | None = None
    language: str | None = None
    relation: str | None = None
    subject: str | None = None
    prompts: tuple[str, ...] | None = None
    prompt_letters: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def validate(self) -> None:
        for name in ("id", "group"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise DataError(f"query {self.id!r}: field {name!r} must be a non-empty string, got "
                                f"{_shown(getattr(self, name))}")
        # Types before content: a number where text belongs would otherwise surface as an AttributeError
        # (``.strip()``) here or deep inside the tokenizer.
        for name in ("question", "answer"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"query {self.id!r}: field {name!r} must be a string, got {_shown(getattr(self, name))}")
        for name in ("language", "relation", "subject"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise DataError(f"query {self.id!r}: field {name!r} must be a string or None, got "
                                f"{_shown(getattr(self, name))}")
        for name in ("options", "prompts", "prompt_letters"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value)):
                raise DataError(f"query {self.id!r}: field {name!r} must be a list of strings or None, got {_shown(value)}")
        if not isinstance(self.meta, dict):
            raise DataError(f"query {self.id!r}: field 'meta' must be a dict, got {_shown(self.meta)}")
        if self.prompts is None:
            if not self.question.strip():
                raise DataError(f"query {self.id!r}: empty question")
            if not self.answer.strip():
                raise DataError(f"query {self.id!r}: empty answer")
        if self.options is not None:
            if len(self.options) < 2:
                raise DataError(f"query {self.id!r}: needs at least 2 options, got {len(self.options)}")
            if len(set(self.options)) != len(self.options):
                raise DataError(f"query {self.id!r}: options repeat: {list(self.options)}")
            if self.answer not in self.options:
                raise DataError(f"query {self.id!r}: the answer {self.answer!r} is not among the options {list(self.options)}")
        if self.prompts is not None:
            if not self.prompts:
                raise DataError(f"query {self.id!r}: 'sentences' is empty")
            if self.prompt_letters is None or len(self.prompt_letters) != len(self.prompts):
                raise DataError(f"query {self.id!r}: needs one answer letter per pre-built prompt")

    @property
    def has_slot(self) -> bool:
        return SLOT in self.question

    @property
    def answer_sep(self) -> str:
        """What joins the cloze prefix and the answer: ``""`` when the ``[Y]`` slot is glued to the text before
        it (Chinese and Japanese write no spaces: ``"法国的首都是[Y]。"``; French ``"l'[Y]"``), else ``" "``."""
        i = self.question.find(SLOT)
        return "" if i > 0 and not self.question[i - 1].isspace() else " "

    def to_dict(self) -> dict[str, Any]:
        """The base's dict without unset fields (None, empty meta): a query file's record stays short.

        ``from_dict`` is the base's: the missing fields take their defaults.
        """
        return {k: v for k, v in super().to_dict().items() if v not in (None, {})}


def _shown(value: Any) -> str:
    """A value's type and a short repr, for one-line messages."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


REQUIRED = ("id", "group", "question", "answer")
# A query's columns as users hold them: the ``Query`` fields (``meta`` is not a column).
COLUMNS = ("id", "group", "question", "answer", "options", "language", "relation", "subject", "prompts",
           "prompt_letters", "meta")
_ACCEPTED = ("a Query, a dict with the fields id, group, question, answer (optional: options, language, relation, "
             "subject), a list of those, or a pandas DataFrame with those columns")


def _is_dataframe(obj: Any) -> bool:
    # Looked up by name, so that pandas is imported only when a DataFrame is actually given.
    return any(k.__name__ == "DataFrame" and k.__module__.startswith("pandas") for k in type(obj).__mro__)


def _frame_records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as dicts; missing cells (NaN, None, pd.NA) are dropped, so optional columns with holes
    take their defaults and a missing required one is named."""
    import pandas as pd

    def missing(v: Any) -> bool:
        return v is None or (pd.api.types.is_scalar(v) and bool(pd.isna(v)))

    return [{str(k): v for k, v in row.items() if not missing(v)} for row in frame.to_dict(orient="records")]


def _from_mapping(row: Mapping[str, Any], i: int) -> Query:
    qid = row.get("id")
    where = f"queries[{i}]" + (f" (id {qid!r})" if isinstance(qid, str) else "")
    unknown = sorted(set(map(str, row)) - set(COLUMNS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; a query has {list(COLUMNS)}")
    missing = [k for k in REQUIRED if k not in row or row[k] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; a query needs {list(REQUIRED)}")
    kw = dict(row)
    for name in ("options", "prompts", "prompt_letters"):
        # Lists (JSON, a DataFrame cell) become the tuples Query holds; numpy arrays too. Anything else is left
        # for Query.validate to name.
        value = kw.get(name)
        if value is not None and not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "__iter__"):
            kw[name] = tuple(value.tolist() if hasattr(value, "tolist") else value)
    try:
        return Query(**kw)
    except DataError as e:  # the message names the query's id already
        raise DataError(f"queries[{i}]: {e}") from None


def as_queries(obj: Any) -> list[Query]:
    """Queries from what a user holds: ``Query`` objects, plain dicts, a pandas DataFrame, or one of them.

    ``locate``, ``accuracy`` and ``lens_locate`` call this first, so each takes any of these.

    Args:
        obj: a ``Query``; a dict with ``id``, ``group``, ``question`` (the prompt text or cloze template, with
            ``[Y]`` where the answer goes), ``answer`` and optionally ``options``, ``language``, ``relation``,
            ``subject``, ``prompts``, ``prompt_letters``, ``meta``; a list or tuple of Queries and dicts; or a
            pandas DataFrame with those columns (empty cells of optional columns take the default).

    Returns:
        The queries, in the given order. A bad record raises ``DataError`` in one line naming its index, id and
        field; an object of another kind one naming what is accepted.

    Example:
        >>> qs = as_queries([{"id": "q1", "group": "math", "question": "2 + 2 =", "answer": "4"}])
        >>> qs == [Query(id="q1", group="math", question="2 + 2 =", answer="4")]
        True
        >>> as_queries({"id": "q2", "group": "math", "question": 7, "answer": "4"})
        Traceback (most recent call last):
        ...
        qrnca_lens.errors.DataError: queries[0]: query 'q2': field 'question' must be a string, got int 7
    """
    if isinstance(obj, (Query, Mapping)):
        items: list[Any] = [obj]
    elif _is_dataframe(obj):
        items = _frame_records(obj)
    elif isinstance(obj, (str, bytes)):
        raise DataError(f"queries: got a string ({obj[:40]!r}); to read a file use load_data(path), else give "
                        f"{_ACCEPTED}")
    elif isinstance(obj, Iterable) and not hasattr(obj, "shape"):
        items = list(obj)
    else:
        raise DataError(f"queries: got {type(obj).__name__}; give {_ACCEPTED}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Query):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(_from_mapping(item, i))
        else:
            raise DataError(f"queries[{i}]: got {type(item).__name__}; each query must be a Query or a dict with the "
                            f"fields {list(REQUIRED)}")
    return out


# What the public entry points take as queries (``as_queries`` turns it into a list of ``Query``); a pandas
# DataFrame is one of the iterables.
QueriesLike = Query | Mapping[str, Any] | Iterable[Any]


def groups_of(queries: Sequence[Query]) -> dict[str, list[Query]]:
    """Queries by group, groups in first-seen order."""
    out: dict[str, list[Query]] = {}
    for q in queries:
        out.setdefault(q.group, []).append(q)
    return out


# ---------------------------------------------------------------- loaders


def _where(path: Path | str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _read_text(path: Path | str) -> str:
    """A data file's text, or a DataError naming the file and the fix (never a raw OSError or decode error)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file; give the path of a .jsonl, .csv or .json "
                        "file") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give a path or one of {['builtin:' + b for b in BUILTIN]}") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied); fix its permissions or copy it") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def _require(row: dict[str, Any], keys: Iterable[str], path: Path | str, line: int) -> None:
    missing = [k for k in keys if k not in row or row[k] in (None, "")]
    if missing:
        raise DataError(f"{_where(path, line)}: missing field(s) {missing}; the record has {sorted(row)}")


def _check_nonempty(queries: list[Query], path: Path | str) -> list[Query]:
    if not queries:
        raise DataError(f"{path}: no queries in the file (it is empty)")
    dup = [k for k, n in Counter(q.id for q in queries).items() if n > 1]
    if dup:
        raise DataError(f"{path}: query ids repeat: {dup[:5]}; ids must be unique")
    return queries


def _jsonl_rows(path: Path | str, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Split on "\n" only: str.splitlines() also breaks at U+2028/U+0085, which JSON allows inside strings.
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(path, i)}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{_where(path, i)}: expected a JSON object, got {type(row).__name__}")
        rows.append((i, row))
    return rows


def _query(path: Path | str, line: int | None, **kw: Any) -> Query:
    try:
        return Query(**kw)
    except DataError as e:
        raise DataError(f"{_where(path, line)}: {e}") from None


def load_jsonl(path: Path | str, *, text: str | None = None) -> list[Query]:
    """Read our JSONL format: one object a line, ``id, group, question, answer`` (see module docstring).

    Args:
        path: the file; with ``text`` it only names the source in error messages.
        text: the file's content, if already read (the file is then not opened).

    Returns:
        The queries in file order; a ``DataError`` naming file and line for a bad record or repeated id.

    Example:
        >>> load_jsonl("mine.jsonl", text='{"id": "q1", "group": "g", "question": "2 + 2 =", "answer": "4"}')
        [Query(id='q1', group='g', question='2 + 2 =', answer='4', ...)]
    """
    text = _read_text(path) if text is None else text
    out = []
    for i, row in _jsonl_rows(path, text):
        _require(row, ("id", "group", "question", "answer"), path, i)
        opts = row.get("options")
        if opts is not None and (not isinstance(opts, list) or not all(isinstance(o, str) for o in opts)):
            raise DataError(f"{_where(path, i)}: 'options' must be a list of strings")
        out.append(
            _query(
                path, i,
                id=str(row["id"]), group=str(row["group"]), question=str(row["question"]),
                answer=str(row["answer"]), options=tuple(opts) if opts else None,
                language=row.get("language"), relation=row.get("relation"), subject=row.get("subject"),
            )
        )
    return _check_nonempty(out, path)


def load_mlama(
    path: Path | str,
    *,
    templates: dict[str, str] | None = None,
    group_by: str = "relation",
    text: str | None = None,
) -> list[Query]:
    """Read mLAMA-style facts: ``subject``, ``relation``, ``object``, a ``template`` per row (or in ``templates``).

    Args:
        path: the JSONL file; with ``text`` it only names the source in error messages.
        templates: relation -> template with ``[X]`` (subject) and ``[Y]`` (answer), for rows without one.
        group_by: ``"relation"`` or ``"language"`` (the paper's language dataset groups by language).
        text: the file's content, if already read.

    Returns:
        Cloze queries: ``question`` is the template with ``[X]`` filled and ``[Y]`` kept, ``answer`` the object.

    Example:
        >>> row = '{"subject": "France", "relation": "P36", "object": "Paris", "template": "[X] has capital [Y] ."}'
        >>> q = load_mlama("facts.jsonl", text=row)[0]
        >>> q.id, q.group, q.question, q.answer
        ('P36-1', 'P36', 'France has capital [Y] .', 'Paris')
    """
    if group_by not in ("relation", "language"):
        raise DataError(f"group_by must be 'relation' or 'language', got {group_by!r}")
    text = _read_text(path) if text is None else text
    out = []
    for i, row in _jsonl_rows(path, text):
        _require(row, ("subject", "relation", "object"), path, i)
        template = row.get("template") or (templates or {}).get(row["relation"])
        if not template:
            raise DataError(f"{_where(path, i)}: no template for relation {row['relation']!r}; add a 'template' field")
        if "[X]" not in template or SLOT not in template:
            raise DataError(f"{_where(path, i)}: template {template!r} must contain [X] and [Y]")
        lang = row.get("language")
        if group_by == "language" and not lang:
            raise DataError(f"{_where(path, i)}: group_by='language' needs a 'language' field")
        group = lang if group_by == "language" else row["relation"]
        qid = str(row.get("id") or f"{row['relation']}-{lang + '-' if lang else ''}{i}")
        out.append(
            _query(
                path, i,
                id=qid, group=str(group), question=template.replace("[X]", str(row["subject"])),
                answer=str(row["object"]), language=lang, relation=str(row["relation"]), subject=str(row["subject"]),
            )
        )
    return _check_nonempty(out, path)


MMLU_HEADER = ["question", "A", "B", "C", "D", "answer"]


def load_mmlu_csv(path: Path | str, *, group: str | None = None, text: str | None = None) -> list[Query]:
    """Read MMLU CSV rows ``question,A,B,C,D,answer`` (header optional); the answer is a letter A-D.

    Args:
        path: the CSV file; its name without ``_test``/``_dev``/``_val`` is the default group.
        group: the group of every row instead of the file name.
        text: the file's content, if already read.

    Returns:
        Multiple-choice queries (``options`` = the four columns), ids ``"{group}-{line}"``.

    Example:
        >>> q = load_mmlu_csv("astronomy_test.csv", text="What orbits Earth?,Moon,Sun,Mars,Venus,A")[0]
        >>> q.id, q.answer, q.options
        ('astronomy-1', 'Moon', ('Moon', 'Sun', 'Mars', 'Venus'))
    """
    text = _read_text(path) if text is None else text
    stem = Path(path).stem
    for suffix in ("_test", "_dev", "_val"):
        stem = stem.removesuffix(suffix)
    group = group or stem
    out = []
    reader = csv.reader(io.StringIO(text, newline=""))
    first = True
    for row in reader:
        # line_num counts physical lines, so errors point at the right line after a multi-line question.
        i = reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        if first and [c.strip() for c in row] == MMLU_HEADER:
            first = False
            continue
        first = False
        if len(row) != 6:
            raise DataError(f"{_where(path, i)}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
        letter = row[5].strip().upper()
        if letter not in ("A", "B", "C", "D"):
            raise DataError(f"{_where(path, i)}: unknown answer letter {row[5]!r}; expected one of A, B, C, D")
        options = tuple(c.strip() for c in row[1:5])
        out.append(
            _query(path, i, id=f"{group}-{i}", group=group, question=row[0].strip(),
                   answer=options["ABCD".index(letter)], options=options)
        )
    return _check_nonempty(out, path)


def load_authors_json(path: Path | str, *, text: str | None = None) -> list[Query]:
    """Read the QRNCA authors' pre-built prompts: ``{id: {"sentences", "obj_label", "relation_name"}}``.

    Args:
        path: the JSON file; with ``text`` it only names the source in error messages.
        text: the file's content, if already read.

    Returns:
        One query per record; its ``prompts`` are the sentences as they are, ``prompt_letters`` their answers.

    Example:
        >>> doc = '{"q1": {"sentences": ["2 + 2 = ? A. 3 B. 4 Answer:"], "obj_label": "B", "relation_name": "math"}}'
        >>> q = load_authors_json("authors.json", text=doc)[0]
        >>> q.group, q.prompts, q.prompt_letters
        ('math', ('2 + 2 = ? A. 3 B. 4 Answer:',), ('B',))
    """
    text = _read_text(path) if text is None else text
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise DataError(f"{_where(path, e.lineno)}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping ids to records, got {type(data).__name__}")
    out = []
    for qid, rec in data.items():
        where = f"{path} (record {qid!r})"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object")
        missing = [k for k in ("sentences", "obj_label") if k not in rec]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        sentences, labels = rec["sentences"], rec["obj_label"]
        if isinstance(labels, str):
            labels = [labels] * len(sentences)
        if not isinstance(sentences, list) or not isinstance(labels, list) or len(labels) != len(sentences):
            raise DataError(f"{where}: 'sentences' and 'obj_label' must be lists of equal length")
        bad = [lab for lab in labels if not (isinstance(lab, str) and len(lab.strip()) == 1 and lab.strip().isalpha())]
        if bad:
            raise DataError(f"{where}: unknown answer letter(s) {bad}; obj_label must hold single letters such as 'A'")
        try:
            q = Query(
                id=str(qid), group=str(rec.get("relation_name") or rec.get("group") or "default"),
                question=str(sentences[0]) if sentences else "", answer=str(labels[0]).strip() if labels else "",
                prompts=tuple(str(s) for s in sentences), prompt_letters=tuple(str(x).strip() for x in labels),
            )
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(q)
    return _check_nonempty(out, path)


def builtin_names() -> tuple[str, ...]:
    return BUILTIN


def _builtin_text(name: str) -> str:
    if name not in BUILTIN:
        raise DataError(f"unknown built-in data set {name!r}; choose one of {['builtin:' + b for b in BUILTIN]}")
    return resources.files("qrnca_lens.data").joinpath("builtin").joinpath(f"{name}.jsonl").read_text(encoding="utf-8")


def load_data(spec: str | Path, *, limit: int | None = None, **kwargs: Any) -> list[Query]:
    """Load queries from ``builtin:NAME`` or a path; the format follows the file (see module docstring).

    Args:
        spec: ``"builtin:facts"``, ``"builtin:domains"`` or a ``.jsonl``/``.csv``/``.json`` path.
        limit: keep the first N queries of every group, in file order, so that small runs still span
            groups (None: all).
        **kwargs: passed to the format's loader (``group_by=`` for mLAMA, ``group=`` for MMLU).

    Returns:
        The queries, in file order.

    Example:
        >>> qs = load_data("builtin:facts", limit=2)
        >>> len(qs), qs[0].id, qs[2].group
        (10, 'capital-01', 'language')
    """
    spec_s = str(spec)
    if spec_s.startswith("builtin:"):
        name = spec_s.split(":", 1)[1]
        queries = load_jsonl(spec_s, text=_builtin_text(name))
    else:
        path = Path(spec_s)
        if not path.exists():
            raise DataError(f"{path}: no such file; give a path or one of {['builtin:' + b for b in BUILTIN]}")
        if path.is_dir():
            raise DataError(f"{path}: is a directory, not a data file; give the path of a .jsonl, .csv or .json file")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            queries = load_mmlu_csv(path, **kwargs)
        elif suffix == ".json":
            queries = load_authors_json(path, **kwargs)
        elif suffix in (".jsonl", ".ndjson"):
            text = _read_text(path)
            first = next((row for _, row in _jsonl_rows(path, text)), None)
            if first is not None and {"subject", "relation", "object"} <= set(first) and "question" not in first:
                queries = load_mlama(path, text=text, **kwargs)
            else:
                queries = load_jsonl(path, text=text)
        else:
            raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl (ours or mLAMA-style), .csv (MMLU) or .json (authors')")
    return queries if limit is None else limit_per_group(queries, limit)


def limit_per_group(queries: Sequence[Query], limit: int | None) -> list[Query]:
    """The first ``limit`` queries of every group, in file order (all of them for ``None``).

    Select with this, and keep the full list as the ``pool`` for distractors and in-context examples, so
    that a query's prompts do not depend on how many queries a run takes.
    """
    if limit is None:
        return list(queries)
    if limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    kept = {q.id for qs in groups_of(queries).values() for q in qs[:limit]}
    return [q for q in queries if q.id in kept]
