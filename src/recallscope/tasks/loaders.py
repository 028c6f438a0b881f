"""Load users' fact files and prompt-pair files (JSON Lines, CSV, TSV), validating every field.

Facts need ``subject``, ``attribute`` and either ``template`` (with ``{}`` for the subject) or
``prompt`` (the full text, containing the subject); ``relation`` and ``aliases`` are optional (CSV
aliases are separated by ``|``); other fields are ignored. Prompt pairs need ``clean``, ``corrupt`` and
``answer``; ``wrong`` is optional; other fields go into ``PromptPair.meta``.

Loading works in four steps:

1. Read the bytes and decode them as UTF-8 (a byte-order mark is allowed).
2. Split them into records: one JSON object per non-blank line (``.jsonl``, ``.ndjson``, ``.json``), or
   a header row plus one row per item (``.csv``, ``.tsv``).
3. Validate each record: required fields present, strings, non-empty; templates with exactly one
   ``{}``; answers that continue the prompt (leading space); then build the items.
4. Reject duplicates (the same prompt twice, or the same clean/corrupt pair twice).

Every problem raises :class:`~recallscope.errors.DatasetFormatError` naming the file, the line, the field
and the fix; a file without items raises :class:`~recallscope.errors.EmptyDatasetError` and a repeated
item :class:`~recallscope.errors.DuplicateItemError`. Nothing else escapes for any file content.
"""

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from recallscope.errors import DatasetFormatError, DuplicateItemError, EmptyDatasetError
from recallscope.tasks.facts import Fact, answer_problem, fact_problem
from recallscope.tasks.pairs import PromptPair

Format = Literal["jsonl", "csv", "tsv"]

_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
                                ".tsv": "tsv"}
FACT_FIELDS = ("subject", "template", "prompt", "attribute", "relation", "aliases")
PAIR_FIELDS = ("clean", "corrupt", "answer", "wrong")
ALIAS_SEPARATOR = "|"


@dataclass(frozen=True)
class _Record:
    """One item as read from the file: its 1-based line number and its raw fields."""

    line: int
    fields: dict[str, Any]


def _where(path: Path, line: int, field: str | None = None) -> str:
    return f"{path}, line {line}" + (f", field {field!r}" if field else "")


def _detect_format(path: Path, format: Format | None) -> Format:
    if format is not None:
        if format not in ("jsonl", "csv", "tsv"):
            raise DatasetFormatError(f"unknown format {format!r} for {path}; use 'jsonl', 'csv' or 'tsv'.")
        return format
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise DatasetFormatError(f"cannot tell the format of {path} from its suffix {path.suffix!r}; name it "
                                 f"{', '.join(_SUFFIXES)} or pass format='jsonl' | 'csv' | 'tsv'.")
    return found


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"cannot read {path} ({exc.strerror or exc}); check the path.") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetFormatError(f"{path}, line {line}: byte {data[exc.start]:#04x} is not valid UTF-8; save "
                                 "the file as UTF-8 text.") from exc


def _jsonl_records(path: Path, text: str) -> list[_Record]:
    records = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            array = line.lstrip()[:1] == "["
            hint = " (A JSON array is not JSON Lines: write one object per line.)" if array else ""
            raise DatasetFormatError(f"{_where(path, line_no)}: not valid JSON ({exc.msg} at column "
                                     f"{exc.colno}). Each line must hold one JSON object such as "
                                     f'{{"subject": "France", ...}}.{hint}') from exc
        except (ValueError, RecursionError) as exc:
            raise DatasetFormatError(f"{_where(path, line_no)}: not valid JSON ({type(exc).__name__}: "
                                     f"{str(exc)[:80]}). Each line must hold one flat JSON object.") from exc
        if not isinstance(value, dict):
            raise DatasetFormatError(f"{_where(path, line_no)}: expected a JSON object {{...}} but found "
                                     f"{_json_type(value)}; write one object per line.")
        records.append(_Record(line_no, value))
    return records


def _csv_header(path: Path, row: list[str], line: int) -> list[str]:
    header = [h.strip().lower() for h in row]
    for i, name in enumerate(header):
        if not name:
            raise DatasetFormatError(f"{_where(path, line)}: header column {i + 1} has no name; name every "
                                     "column (e.g. subject,template,attribute).")
        if name in header[:i]:
            raise DatasetFormatError(f"{_where(path, line)}: header names column {name!r} twice; rename or "
                                     "drop one of them.")
    return header


def _csv_records(path: Path, text: str, delimiter: str) -> list[_Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = _csv_header(path, row, reader.line_num)
                continue
            if len(row) != len(header):
                raise DatasetFormatError(f"{_where(path, reader.line_num)}: row has {len(row)} fields but "
                                         f"the header has {len(header)} ({delimiter.join(header)[:80]}); "
                                         "quote fields that contain the delimiter and give every column a "
                                         "value.")
            records.append(_Record(reader.line_num, dict(zip(header, row))))
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DatasetFormatError(f"{_where(path, reader.line_num)}: malformed {kind} ({exc}); check the "
                                 "quoting on this line.") from exc
    return records


def _records(path: str | os.PathLike, format: Format | None, what: str) -> tuple[Path, list[_Record]]:
    path = Path(path)
    fmt = _detect_format(path, format)
    text = _read_text(path)
    if fmt == "jsonl":
        records = _jsonl_records(path, text)
    else:
        records = _csv_records(path, text, "," if fmt == "csv" else "\t")
    if not records:
        raise EmptyDatasetError(f"{path} holds no {what}; add at least one "
                                f"{'JSON object per line' if fmt == 'jsonl' else 'row below the header'}.")
    return path, records


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
             type(None): "null", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A short rendering of a JSON scalar for error messages (containers are only named)."""
    if isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 10**12):
        return f" ({json.dumps(value)})"
    return ""


def _text(path: Path, line: int, name: str, value: Any) -> str:
    """``value`` if it is a non-blank, encodable string; else the error for field ``name``."""
    if not isinstance(value, str):
        raise DatasetFormatError(f"{_where(path, line, name)}: must be a string but is {_json_type(value)}"
                                 f"{_shown(value)}; quote it, e.g. \"{name}\": \"...\".")
    if not value.strip():
        raise DatasetFormatError(f"{_where(path, line, name)}: is empty or blank; give a value, or omit the "
                                 "field if it is optional.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetFormatError(f"{_where(path, line, name)}: contains an unpaired surrogate escape (such "
                                 "as \\ud800); fix the text's encoding.") from exc
    return value


def _required(path: Path, rec: _Record, name: str) -> str:
    value = rec.fields.get(name)
    if value is None:
        have = ", ".join(sorted(str(k) for k in rec.fields)) or "none"
        raise DatasetFormatError(f"{_where(path, rec.line, name)}: missing (or null) but required; add it "
                                 f"(fields present: {have}).")
    return _text(path, rec.line, name, value)


def _optional(path: Path, rec: _Record, name: str) -> str | None:
    """Field ``name``, or None when absent, null or (as CSV writes absence) the empty string."""
    value = rec.fields.get(name)
    if value is None or value == "":
        return None
    return _text(path, rec.line, name, value)


def _aliases(path: Path, rec: _Record) -> tuple[str, ...]:
    value = rec.fields.get("aliases")
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items: list[Any] = value.split(ALIAS_SEPARATOR)
    elif isinstance(value, list):
        items = value
    else:
        raise DatasetFormatError(f"{_where(path, rec.line, 'aliases')}: must be a list of strings (JSON) or "
                                 f"'{ALIAS_SEPARATOR}'-separated text (CSV), not {_json_type(value)}.")
    return tuple(_text(path, rec.line, "aliases", item) for item in items)


def _template(path: Path, rec: _Record, subject: str) -> tuple[str, str]:
    """The fact's template and the field it came from (``template``, or ``prompt`` minus the subject)."""
    template = _optional(path, rec, "template")
    prompt = _optional(path, rec, "prompt")
    if template is not None and prompt is not None:
        raise DatasetFormatError(f"{_where(path, rec.line, 'template')}: both 'template' and 'prompt' are "
                                 "given; keep one ('template' with {} for the subject, or the full "
                                 "'prompt').")
    if template is not None:
        return template, "template"
    if prompt is None:
        raise DatasetFormatError(f"{_where(path, rec.line, 'template')}: missing; give 'template' (with {{}} "
                                 "for the subject, e.g. 'The capital of {} is') or 'prompt' (the full text).")
    if subject not in prompt:
        raise DatasetFormatError(f"{_where(path, rec.line, 'prompt')}: {prompt[:60]!r} does not contain the "
                                 f"subject {subject!r}; include it, or give a 'template' with {{}} instead.")
    if "{}" in prompt:
        raise DatasetFormatError(f"{_where(path, rec.line, 'prompt')}: {prompt[:60]!r} contains a literal "
                                 "'{}', which would be read as the subject placeholder; remove it.")
    return prompt.replace(subject, "{}", 1), "prompt"


def _fact(path: Path, rec: _Record, default_relation: str) -> Fact:
    subject = _required(path, rec, "subject")
    attribute = _required(path, rec, "attribute")
    template, source = _template(path, rec, subject)
    relation = _optional(path, rec, "relation") or default_relation
    problem = fact_problem(subject, template, attribute)
    if problem is not None:
        field = source if problem[0] == "template" else problem[0]
        raise DatasetFormatError(f"{_where(path, rec.line, field)}: {problem[1]}.")
    return Fact(subject=subject, relation=relation, template=template, attribute=attribute,
                aliases=_aliases(path, rec))


def _answer_check(path: Path, rec: _Record, fields: tuple[str, str], prompt: str, answer: str) -> None:
    """The same prompt/answer rules as facts: no trailing space, answer not glued to the last word."""
    problem = answer_problem(prompt, answer)
    if problem is not None:
        field = fields[0] if problem[0] == "prompt" else fields[1]
        raise DatasetFormatError(f"{_where(path, rec.line, field)}: {problem[1]}.")


def _pair(path: Path, rec: _Record) -> PromptPair:
    clean, corrupt, answer = (_required(path, rec, f) for f in ("clean", "corrupt", "answer"))
    wrong = _optional(path, rec, "wrong")
    _answer_check(path, rec, ("clean", "answer"), clean, answer)
    if wrong is not None:
        _answer_check(path, rec, ("corrupt", "wrong"), corrupt, wrong)
        if wrong == answer:
            raise DatasetFormatError(f"{_where(path, rec.line, 'wrong')}: equals the answer {answer!r}, so "
                                     "a logit difference would always be 0; give the corrupt prompt's own "
                                     "answer.")
    meta = {k: v for k, v in rec.fields.items() if k not in PAIR_FIELDS}
    meta.update(source=str(path), line=rec.line)
    return PromptPair(clean=clean, corrupt=corrupt, answer=answer, wrong=wrong, meta=meta)


def _reject_duplicates(path: Path, keys: Sequence[Any], lines: Sequence[int], what: str) -> None:
    seen: dict[Any, int] = {}
    for key, line in zip(keys, lines):
        if key in seen:
            raise DuplicateItemError(f"{path}, line {line}: duplicates the {what} on line {seen[key]} "
                                     f"({key!r}); delete one of the two lines.")
        seen[key] = line


def load_facts(path: str | os.PathLike, *, format: Format | None = None,
               default_relation: str = "custom") -> list[Fact]:
    """Facts from a JSONL, CSV or TSV file (format from the suffix unless given), validated, in file order.

    ``default_relation`` names the relation of items without a ``relation`` field. Two items with the
    same prompt are a :class:`DuplicateItemError` (give alternative answers as ``aliases``).
    """
    path, records = _records(path, format, "facts")
    facts = [_fact(path, rec, default_relation) for rec in records]
    _reject_duplicates(path, [f.prompt for f in facts], [r.line for r in records], "fact with the prompt")
    return facts


def load_prompt_pairs(path: str | os.PathLike, *, format: Format | None = None) -> list[PromptPair]:
    """Prompt pairs (clean, corrupt, answer, optional wrong) from a JSONL, CSV or TSV file, validated.

    Extra fields land in each pair's ``meta`` with the source file and line. Spans are left empty: a
    raw pair does not say where its subject is.
    """
    path, records = _records(path, format, "prompt pairs")
    pairs = [_pair(path, rec) for rec in records]
    _reject_duplicates(path, [(p.clean, p.corrupt) for p in pairs], [r.line for r in records],
                       "pair (clean, corrupt)")
    return pairs


def save_facts(facts: Sequence[Fact], path: str | os.PathLike) -> Path:
    """Write facts as JSON Lines that :func:`load_facts` reads back unchanged."""
    path = Path(path)
    lines = []
    for f in facts:
        rec: dict[str, Any] = {"relation": f.relation, "subject": f.subject, "template": f.template,
                               "attribute": f.attribute}
        if f.aliases:
            rec["aliases"] = list(f.aliases)
        lines.append(json.dumps(rec, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
