"""More prompts for a route query: CIs and paired tests over prompts need several templates.

:func:`expand_prompts` keeps the user's prompts and, while there are fewer than ``n``, adds each prompt
behind a neutral context prefix ("Question: The acronym VAT stands for"), prefix by prefix, so the question
(and where the input sits in it) stays the same and only the context before it varies. Prefixes that the
model's tokenizer cannot encode (unknown-token ids) are skipped.
"""

from typing import Any, Sequence

from recallscope.errors import ConfigError
from recallscope.routes.config import TEMPLATE_PREFIXES


def _encodes(model: Any, text: str) -> bool:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return True
    unk = getattr(tok, "unk_token_id", None)
    ids = tok.encode(text, add_special_tokens=False)
    return bool(ids) and (unk is None or unk not in ids)


def expand_prompts(prompts: Sequence[str], n: int, *, prefixes: Sequence[str] | None = None,
                   model: Any = None) -> tuple[str, ...]:
    """``prompts`` plus prefixed copies until there are ``n`` (``n = 0`` or enough prompts: unchanged).

    Raises:
        ConfigError: too few usable prefixes to reach ``n`` prompts (pass more ``prefixes`` or more prompts).
    """
    prompts = tuple(dict.fromkeys(prompts))
    if n <= len(prompts):
        return prompts
    usable = [p for p in (TEMPLATE_PREFIXES if prefixes is None else prefixes)
              if model is None or _encodes(model, p.strip() or p)]
    out = list(prompts)
    for prefix in usable:
        for prompt in prompts:
            text = prefix + prompt
            if text not in out:
                out.append(text)
            if len(out) >= n:
                return tuple(out)
    raise ConfigError(f"only {len(out)} prompts can be made from {len(prompts)} prompt(s) and {len(usable)} usable "
                      f"template prefixes, fewer than n_templates={n}; give more prompts, more template_prefixes, "
                      "or a smaller n_templates.")
