"""Tests for the fact and prompt-pair file loaders: formats, error messages, and fuzzing."""

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recallscope.errors import DatasetFormatError, DuplicateItemError, EmptyDatasetError, RecallscopeError
from recallscope.tasks.facts import Fact, load_builtin_facts
from recallscope.tasks.loaders import load_facts, load_prompt_pairs, save_facts
from recallscope.tasks.pairs import PromptPair


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(*records: dict) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


PARIS = {"subject": "France", "template": "The capital of {} is", "attribute": " Paris",
         "relation": "capital"}
PAIR = {"clean": "The capital of France is", "corrupt": "The capital of Spain is", "answer": " Paris",
        "wrong": " Madrid"}


# --------------------------------------------------------------------------------------------- loading


def test_builtin_facts_round_trip(tmp_path):
    facts = load_builtin_facts()
    assert load_facts(save_facts(facts, tmp_path / "facts.jsonl")) == facts


def test_jsonl_facts_with_prompt_aliases_and_blank_lines(tmp_path):
    text = _jsonl(PARIS) + "\n   \n" + _jsonl({"subject": "Ukraine", "prompt": "The capital of Ukraine is",
                                               "attribute": " Kyiv", "aliases": [" Kiev"], "id": 7})
    facts = load_facts(_write(tmp_path / "f.jsonl", text))
    assert facts == [
        Fact("France", "capital", "The capital of {} is", " Paris"),
        Fact("Ukraine", "custom", "The capital of {} is", " Kyiv", aliases=(" Kiev",)),
    ]


def test_csv_and_tsv_facts(tmp_path):
    csv_text = 'Subject,template,attribute,aliases\nUkraine,The capital of {} is, Kyiv, Kiev| Kyyiv\n' \
               '"Washington, D.C.",{} is the capital of the, United States,\n'
    facts = load_facts(_write(tmp_path / "f.csv", csv_text), default_relation="capital")
    assert facts[0] == Fact("Ukraine", "capital", "The capital of {} is", " Kyiv",
                            aliases=(" Kiev", " Kyyiv"))
    assert facts[1].prompt == "Washington, D.C. is the capital of the" and facts[1].aliases == ()
    tsv_text = "subject\ttemplate\tattribute\nFrance\tThe capital of {} is\t Paris\n"
    assert load_facts(_write(tmp_path / "f.tsv", tsv_text))[0].attribute == " Paris"
    assert load_facts(_write(tmp_path / "f.txt", tsv_text), format="tsv")[0].subject == "France"


def test_prompt_pairs_jsonl_and_csv(tmp_path):
    second = {**PAIR, "corrupt": "The capital of Italy is", "wrong": None, "note": [1]}
    pairs = load_prompt_pairs(_write(tmp_path / "p.jsonl", _jsonl(PAIR, second)))
    assert pairs[0] == PromptPair(**PAIR, meta={"source": str(tmp_path / "p.jsonl"), "line": 1})
    assert pairs[1].wrong is None and pairs[1].meta["note"] == [1] and pairs[1].meta["line"] == 2
    rows = "clean,corrupt,answer,wrong\nThe capital of France is,The capital of Spain is, Paris,\n"
    (pair,) = load_prompt_pairs(_write(tmp_path / "p.csv", rows))
    assert (pair.clean, pair.answer, pair.wrong) == ("The capital of France is", " Paris", None)


# ---------------------------------------------------------------------------------------------- errors

FACT_ERRORS = [
    # (name, file name, content, error type, substrings the message must contain)
    ("missing field", "f.jsonl", _jsonl(PARIS, {"subject": "Spain", "template": "The capital of {} is"}),
     DatasetFormatError,
     ["f.jsonl, line 2", "field 'attribute'", "missing", "fields present: subject, template"]),
    ("wrong type", "f.jsonl", _jsonl({**PARIS, "subject": 3}),
     DatasetFormatError, ["line 1", "field 'subject'", "must be a string but is a number (3)", "quote it"]),
    ("aliases not a list", "f.jsonl", _jsonl({**PARIS, "aliases": {"a": 1}}),
     DatasetFormatError, ["line 1", "field 'aliases'", "list of strings"]),
    ("empty file", "f.jsonl", "", EmptyDatasetError, ["f.jsonl holds no facts", "add at least one"]),
    ("blank lines only", "f.jsonl", "\n  \n", EmptyDatasetError, ["holds no facts"]),
    ("header only", "f.csv", "subject,template,attribute\n", EmptyDatasetError, ["row below the header"]),
    ("template without {}", "f.jsonl", _jsonl({**PARIS, "template": "The capital of France is"}),
     DatasetFormatError, ["line 1", "field 'template'", "0 '{}' placeholders", "where the subject goes"]),
    ("two placeholders", "f.jsonl", _jsonl({**PARIS, "template": "{} and {} is"}),
     DatasetFormatError, ["field 'template'", "2 '{}' placeholders"]),
    ("duplicate", "f.jsonl", _jsonl(PARIS, {**PARIS, "subject": "Spain"}, {**PARIS, "attribute": " Lyon"}),
     DuplicateItemError, ["line 3", "duplicates", "line 1", "The capital of France is", "delete one"]),
    ("bad JSON", "f.jsonl", _jsonl(PARIS) + '{"subject": "Spain",\n',
     DatasetFormatError, ["f.jsonl, line 2", "not valid JSON", "column", "one JSON object"]),
    ("JSON array", "f.json", json.dumps([PARIS], indent=1),
     DatasetFormatError, ["line 1", "not valid JSON", "A JSON array is not JSON Lines"]),
    ("not an object", "f.jsonl", '["France", " Paris"]\n',
     DatasetFormatError, ["line 1", "expected a JSON object", "a list"]),
    ("attribute glued", "f.jsonl", _jsonl({**PARIS, "attribute": "Paris"}),
     DatasetFormatError, ["field 'attribute'", "no leading space", "' Paris'"]),
    ("trailing space", "f.jsonl", _jsonl({**PARIS, "template": "The capital of {} is "}),
     DatasetFormatError, ["field 'template'", "ends with whitespace"]),
    ("prompt trailing space", "f.jsonl",
     _jsonl({"subject": "France", "prompt": "The capital of France is ", "attribute": "Paris"}),
     DatasetFormatError, ["field 'prompt'", "ends with whitespace"]),
    ("template and prompt", "f.jsonl", _jsonl({**PARIS, "prompt": "The capital of France is"}),
     DatasetFormatError, ["field 'template'", "both 'template' and 'prompt'"]),
    ("neither template nor prompt", "f.jsonl", _jsonl({"subject": "France", "attribute": " Paris"}),
     DatasetFormatError, ["field 'template'", "missing", "'prompt'"]),
    ("prompt lacks subject", "f.jsonl",
     _jsonl({"subject": "Spain", "prompt": "The capital of France is", "attribute": " Paris"}),
     DatasetFormatError, ["field 'prompt'", "does not contain the subject 'Spain'"]),
    ("blank subject", "f.jsonl", _jsonl({**PARIS, "subject": "  "}),
     DatasetFormatError, ["field 'subject'", "empty or blank"]),
    ("padded subject", "f.jsonl", _jsonl({**PARIS, "subject": " France"}),
     DatasetFormatError, ["field 'subject'", "whitespace"]),
    ("surrogate", "f.jsonl",
     '{"subject": "Fr\\ud800", "template": "The capital of {} is", "attribute": " P"}\n',
     DatasetFormatError, ["field 'subject'", "surrogate"]),
    ("not UTF-8", "f.jsonl", _jsonl(PARIS).encode() + b'{"subject": "\xff"}\n',
     DatasetFormatError, ["line 2", "not valid UTF-8"]),
    ("ragged CSV row", "f.csv", "subject,template,attribute\nFrance,The capital of {} is, Paris,extra\n",
     DatasetFormatError, ["f.csv, line 2", "4 fields but the header has 3", "quote fields"]),
    ("CSV missing column", "f.csv", "subject,template\nFrance,The capital of {} is\n",
     DatasetFormatError, ["line 2", "field 'attribute'", "missing"]),
    ("CSV duplicate column", "f.csv", "subject,subject,attribute\na,b,c\n",
     DatasetFormatError, ["line 1", "column 'subject' twice"]),
    ("CSV unnamed column", "f.csv", "subject,,attribute\na,b,c\n",
     DatasetFormatError, ["line 1", "column 2 has no name"]),
    ("unknown suffix", "f.txt", _jsonl(PARIS), DatasetFormatError, ["suffix '.txt'", "format="]),
]


@pytest.mark.parametrize("name, filename, content, error, fragments", FACT_ERRORS,
                         ids=[c[0] for c in FACT_ERRORS])
def test_fact_file_errors_name_file_line_field_and_fix(tmp_path, name, filename, content, error, fragments):
    path = _write(tmp_path / filename, content)
    with pytest.raises(error) as info:
        load_facts(path)
    message = str(info.value)
    assert str(tmp_path) in message
    for fragment in fragments:
        assert fragment in message, (name, message)


PAIR_ERRORS = [
    ("missing corrupt", _jsonl({k: v for k, v in PAIR.items() if k != "corrupt"}), DatasetFormatError,
     ["line 1", "field 'corrupt'", "missing"]),
    ("wrong equals answer", _jsonl({**PAIR, "wrong": " Paris"}), DatasetFormatError,
     ["field 'wrong'", "equals the answer"]),
    ("answer glued", _jsonl({**PAIR, "answer": "Paris"}), DatasetFormatError, ["field 'answer'", "' Paris'"]),
    ("corrupt trailing space", _jsonl({**PAIR, "corrupt": "The capital of Spain is "}), DatasetFormatError,
     ["field 'corrupt'", "ends with whitespace"]),
    ("duplicate pair", _jsonl(PAIR, {**PAIR, "answer": " Lyon"}), DuplicateItemError,
     ["line 2", "line 1", "duplicates the pair"]),
    ("empty", "\n", EmptyDatasetError, ["holds no prompt pairs"]),
]


@pytest.mark.parametrize("name, content, error, fragments", PAIR_ERRORS, ids=[c[0] for c in PAIR_ERRORS])
def test_pair_file_errors(tmp_path, name, content, error, fragments):
    with pytest.raises(error) as info:
        load_prompt_pairs(_write(tmp_path / "p.jsonl", content))
    for fragment in fragments:
        assert fragment in str(info.value), (name, str(info.value))


def test_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetFormatError, match="cannot read"):
        load_facts(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _load_or_recallscope_error(path: Path) -> None:
    """The property: any content either loads or raises a RecallscopeError (never anything else)."""
    for loader in (load_facts, load_prompt_pairs):
        try:
            items = loader(path)
        except RecallscopeError:
            continue
        assert items and all(isinstance(i, (Fact, PromptPair)) for i in items)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = st.sampled_from(["subject", "template", "prompt", "attribute", "relation", "aliases", "clean",
                          "corrupt", "answer", "wrong", "other"])
SAMPLES = ["{}", "The capital of {} is", " Paris", "France", "Paris", "The capital of France is"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(SAMPLES),
    lambda children: (st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=8,
)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]))
def test_fuzz_arbitrary_bytes(fuzz_dir, data, suffix):
    _load_or_recallscope_error(_write(fuzz_dir / f"bytes{suffix}", data))


@FUZZ
@given(text=st.text(max_size=300), suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]))
def test_fuzz_arbitrary_text(fuzz_dir, text, suffix):
    _load_or_recallscope_error(_write(fuzz_dir / f"text{suffix}", text.encode("utf-8", "surrogatepass")))


@FUZZ
@given(records=st.lists(st.dictionaries(FIELDS, JSON_VALUES, max_size=6) | JSON_VALUES, max_size=4))
def test_fuzz_json_lines(fuzz_dir, records):
    text = "\n".join(json.dumps(r) for r in records)
    _load_or_recallscope_error(_write(fuzz_dir / "records.jsonl", text))


@FUZZ
@given(header=st.lists(FIELDS, max_size=6),
       rows=st.lists(st.lists(st.text(max_size=10) | st.sampled_from(SAMPLES), max_size=6), max_size=4))
def test_fuzz_csv_rows(fuzz_dir, header, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    _load_or_recallscope_error(_write(fuzz_dir / "rows.csv", buf.getvalue().encode("utf-8", "surrogatepass")))


@FUZZ
@given(drop=st.sets(st.sampled_from(sorted(PARIS) + sorted(PAIR))),
       change=st.dictionaries(FIELDS, JSON_VALUES, max_size=2), n_copies=st.integers(1, 2))
def test_fuzz_mutated_valid_records(fuzz_dir, drop, change, n_copies):
    record = {k: v for k, v in {**PARIS, **PAIR}.items() if k not in drop}
    record.update(change)
    path = _write(fuzz_dir / "mutated.jsonl", _jsonl(*[record] * n_copies))
    _load_or_recallscope_error(path)
    if not drop and not change and n_copies == 1:  # the untouched record is valid for both loaders
        assert len(load_facts(path)) == len(load_prompt_pairs(path)) == 1


def test_byte_order_mark_and_crlf_line_endings(tmp_path):
    text = "\ufeff" + _jsonl(PARIS).replace("\n", "\r\n") + "\r\n" + _jsonl({**PARIS, "subject": "Spain",
                                                                          "attribute": " Madrid"})
    facts = load_facts(_write(tmp_path / "f.jsonl", text))
    assert [f.subject for f in facts] == ["France", "Spain"]
    rows = "\ufeffsubject,template,attribute\r\nFrance,The capital of {} is, Paris\r\n"
    assert load_facts(_write(tmp_path / "f.csv", rows))[0].subject == "France"
    with pytest.raises(DatasetFormatError, match="line 3"):  # line numbers still count CRLF lines
        load_facts(_write(tmp_path / "g.jsonl", text.replace('"Spain"', "Spain")))
