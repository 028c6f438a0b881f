"""Fit (or load the cached) Jacobian lens of SmolLM2 and score the VAT query with it.

1. Fit ``JacobianLens`` natively on SmolLM2 (offline; the built-in fact-sentence corpus) with recallscope's
   defaults, or load it from the user cache (keyed by the weight hash); report the time.
2. VAT query over several phrasings: the J-lens rank of each concept at the " VAT" token, per fitted layer,
   and the concept-swap score at ``--layer``: swapping the concept with a counter-concept (``--counter``)
   must lower " Value" more than swapping any control (the input itself, the output itself, unrelated
   words) with the same counter-concept.
3. With ``--das LAYER``: DAS on the acronyms SmolLM2 expands (``known_acronyms``), concept variable = the
   expansion's first word, in "The acronym{input} stands for", at the residual entering ``LAYER`` at the
   acronym's last token, with TL's controls (arbitrary labels, random-init model, norm-matched placebo).

    OMP_NUM_THREADS=1 python experiments/jacobian_lens_smollm2.py --out /tmp/jlens_vat
    OMP_NUM_THREADS=1 python experiments/jacobian_lens_smollm2.py --out /tmp/jlens_vat --das 15 --skip-jlens
"""

import argparse
import json
import time
from pathlib import Path

import torch

PROMPTS = ("The acronym VAT stands for", "In accounting, VAT stands for", "The abbreviation VAT stands for",
           "In Europe, VAT stands for", "Shoppers know that VAT stands for", "On the receipt, VAT stands for",
           "The tax called VAT stands for", "In the UK, VAT stands for")
CONCEPTS = (" tax", " value", " added")
CONTROLS = (" VAT", " Value", " price", " the", " car")


def main() -> None:
    from recallscope import load_model
    from recallscope.routes.das import DASConfig
    from recallscope.routes.jacobian import JLensConfig, jacobian_lens, jlens_route_score, lens_cache_path, resolved

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/jlens_vat", help="directory for summary.json and the results")
    ap.add_argument("--n-prompts", type=int, default=JLensConfig.n_prompts, help="corpus paragraphs to fit on")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="source layers (default: auto_layers)")
    ap.add_argument("--layer", type=int, default=None, help="swap layer (default: the lowest fitted layer)")
    ap.add_argument("--counter", default=" dog", help="counter-concept swapped in")
    ap.add_argument("--alpha", type=float, default=2.0, help="swap strength (2 = the paper's double strength)")
    ap.add_argument("--das", type=int, default=None, metavar="LAYER", help="also run DAS at this layer")
    ap.add_argument("--das-rank", type=int, default=4, help="DAS subspace rank")
    ap.add_argument("--das-epochs", type=int, default=10, help="DAS epochs")
    ap.add_argument("--das-batch", type=int, default=16, help="DAS pairs per step")
    ap.add_argument("--das-lr", type=float, default=2e-2, help="DAS learning rate")
    ap.add_argument("--skip-jlens", action="store_true", help="skip the Jacobian-lens part")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2")
    if args.das is not None:
        das_acronyms(model, args.das, out, DASConfig(rank=args.das_rank, epochs=args.das_epochs,
                                                     batch_size=args.das_batch, lr=args.das_lr))
    if args.skip_jlens:
        return
    cfg = resolved(JLensConfig(layers=tuple(args.layers) if args.layers else None, n_prompts=args.n_prompts), model)
    from recallscope.routes.jacobian import default_corpus

    cached = lens_cache_path(model, cfg, default_corpus(cfg.n_prompts)).is_file()
    t0 = time.perf_counter()
    lens = jacobian_lens(model, cfg)
    fit_s = time.perf_counter() - t0
    summary = {"lens": {"config": cfg.to_dict(), "was_cached": cached, "seconds": round(fit_s, 1),
                        "torch_threads": torch.get_num_threads()}, "prompts": list(PROMPTS), "concepts": {}}
    layer = args.layer if args.layer is not None else lens.source_layers[0]
    for concept in CONCEPTS:
        controls = [c for c in CONTROLS if c != concept]
        r = jlens_route_score(model, lens, PROMPTS, " VAT", " Value", concept, args.counter, controls, layer=layer,
                              alpha=args.alpha)
        r.save(out / f"concept_{concept.strip()}")
        summary["concepts"][concept] = {**r.summary(), "median_rank_by_layer": dict(zip(
            map(str, r.layers), r.ranks.median(0).values.tolist()))}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))


def acronym_variable(model):
    """The acronyms SmolLM2 expands whose prompt has VAT's token count and whose output is one token."""
    from recallscope.routes.acronyms import known_acronyms
    from recallscope.routes.das import ConceptVariable

    template = "The acronym{input} stands for"
    n_tokens = model.to_tokens(template.format(input=" VAT")).shape[1]
    keep = [k for k in known_acronyms(model) if model.to_tokens(template.format(input=" " + k.acronym)).shape[1]
            == n_tokens and len(model.tokenizer.encode(k.output, add_special_tokens=False)) == 1]
    values = tuple(k.output for k in keep)
    return ConceptVariable(template, tuple(" " + k.acronym for k in keep), values, {v: v for v in values})


def das_acronyms(model, layer: int, out: Path, config) -> None:
    from recallscope.routes.das import das_route_score

    variable = acronym_variable(model)
    t0 = time.perf_counter()
    result = das_route_score(model, variable.pairs(model), layer, config)
    result.save(out / f"das_L{layer}")
    summary = {"inputs": list(variable.inputs), "values": list(variable.values), "config": config.to_dict(),
               **result.summary(),
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / f"das_L{layer}.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
