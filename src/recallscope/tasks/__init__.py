"""Task suites: prompts, answers, spans and counterfactual pairs (base64 and facts).

Importing this package is cheap: each name below loads its module (and torch) on first use.
"""

import importlib

_LAZY: dict[str, str] = {
    # base64 suite: codec, dependency map, alignment, stimuli, prompts, pairs
    **dict.fromkeys(
        [
            "ALPHABET", "PAD", "CHARS", "MNEMONIC_HOOKS", "WORDS", "DEFAULT_TEMPLATE",
            "AlignedToken", "Base64Alignment", "Base64Stimulus", "DependencyMap", "FewShotPrompt",
            "FewShotTemplate", "StimulusKind", "TokenOffsets",
            "align_tokens", "bytes_for_char", "char_stimuli", "chars_for_byte", "continuation_token",
            "counterfactual_pairs", "decode", "decode_text", "decoded_length", "dependency_map", "encode",
            "encoded_length", "few_shot_prompt", "few_shot_prompts", "make_stimulus", "sentence_stimuli",
            "token_offsets", "word_stimuli",
        ],
        "recallscope.tasks.b64",
    ),
    **dict.fromkeys(
        ["TokenizationReport", "TokenizerB64Stats", "tokenization_report"],
        "recallscope.tasks.b64_report",
    ),
    # fact suite and user-data loaders. The facts suite's counterfactual_pairs is not exported here (the
    # name is the base64 suite's): use recallscope.tasks.facts.counterfactual_pairs.
    **dict.fromkeys(
        [
            "Fact", "Relation", "RecallResult", "CounterfactualPairs", "load_builtin_facts", "fact_spans",
            "recalled_facts", "trace_items",
        ],
        "recallscope.tasks.facts",
    ),
    **dict.fromkeys(["load_facts", "load_prompt_pairs", "save_facts"], "recallscope.tasks.loaders"),
    **dict.fromkeys(["PromptPair", "TokenizedPairs", "group_by_length", "tokenize_pairs"], "recallscope.tasks.pairs"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recallscope.tasks' has no attribute {name!r}")


__all__ = sorted(_LAZY)
