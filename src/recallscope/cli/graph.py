"""recallscope transcoders / graph: train transcoders for a model, and draw a feature-level attribution graph."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from recallscope.cli.common import _int_list, _placement, add_command


_SMALL = {"d_sae": 256, "k": 8, "steps": 1000, "batch_size": 512, "n_seqs": 2000, "seq_len": None,
          "skip_bos": False}
"""Defaults for organisms (tiny models; text = task prompts + the model's own generations)."""
_LARGE = {"d_sae": 1024, "k": 32, "steps": 300, "batch_size": 256, "n_tokens": 60_000, "eval_tokens": 2048, "seq_len": 128,
          "skip_bos": True}
"""Defaults for other models (SmolLM2...): text = Python's documentation (see features.data)."""


def _is_organism(spec: str) -> bool:
    return str(spec).strip().lower().startswith("organism:")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's settings with the model kind's defaults filled in; bad values are errors."""
    from recallscope.errors import ConfigError

    small = _is_organism(args.model)
    base = _SMALL if small else _LARGE
    st: dict[str, Any] = {key: getattr(args, key) if getattr(args, key, None) is not None else base.get(key)
          for key in ("d_sae", "k", "steps", "batch_size", "n_seqs", "n_tokens", "eval_tokens", "seq_len",
                      "skip_bos")}
    st["corpus"] = {"self": "task+self", None: "task+self" if small else "python-docs"}.get(args.corpus, args.corpus)
    if st["corpus"] == "task+self" and not small:
        raise ConfigError("--corpus self is for organisms; use python-docs or --text-file for other models.")
    if args.text_file:
        st["corpus"] = "text-files"
        missing = [f for f in args.text_file if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"--text-file {missing[0]} does not exist; give readable UTF-8 text files.")
    for key in ("d_sae", "k", "steps", "batch_size", "n_seqs", "n_tokens", "eval_tokens"):
        if st[key] is not None and st[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {st[key]}.")
    if st["k"] > st["d_sae"]:
        raise ConfigError(f"--k {st['k']} is larger than --d-sae {st['d_sae']}; each token can use at most d_sae "
                          "features (e.g. --k 32 --d-sae 2048).")
    return st


def _texts(model: Any, st: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Any]:
    """(training tokens, held-out tokens) for the settings."""
    from recallscope.errors import ConfigError
    from recallscope.features.data import python_docs_text, text_windows, training_tokens
    from recallscope.features.train import split_heldout

    if st["corpus"] == "task+self":
        return split_heldout(training_tokens(model, st["n_seqs"], seed=args.seed, seq_len=st["seq_len"]), 0.1)
    seq_len, first = st["seq_len"], 1 if st["skip_bos"] else 0
    if not 2 + first <= seq_len <= int(model.cfg.n_ctx):
        raise ConfigError(f"--seq-len must be in {2 + first}..{int(model.cfg.n_ctx)} (the model's context), got "
                          f"{seq_len}.")
    per_seq = seq_len - first
    n_train, n_eval = -(-st["n_tokens"] // per_seq), -(-st["eval_tokens"] // per_seq)
    need = int((n_train + n_eval) * seq_len * 6)  # characters: about 4-5 per token, with room to spare
    if st["corpus"] == "text-files":
        text = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text_file)
    else:
        text = python_docs_text(need)
    rows = text_windows(model, text, n_train + n_eval, seq_len, seed=args.seed)
    return rows[n_eval:], rows[:n_eval]


def _use_shipped(spec: str, full_cfg: dict[str, Any], out: Path) -> bool:
    """At the default organism settings, copy the shipped set into ``out`` instead of training."""
    from recallscope.features.shipped import copy_shipped, matching_shipped

    src = matching_shipped(spec, full_cfg)
    if src is None:
        return False
    copy_shipped(src, out)
    rec = json.loads((src / "shipped.json").read_text())
    for layer, ev in rec["explained_variance"].items():
        print(f"layer {layer}: explained variance {ev:.4f}, dead features {rec['dead_fraction'][layer]:.1%}")
    fid = rec["fidelity"]["all"]
    print(f"replacement model (held out, {fid['n_positions']} positions): KL {fid['kl']:.4g} nats, "
          f"top-1 agreement {fid['top1_agreement']:.3f}")
    print(f"shipped set for {spec} (default settings, organism weights verified): no training; wrote {out} "
          "(--no-shipped trains instead)")
    return True


def _cmd_transcoders(args: argparse.Namespace) -> int:
    from recallscope.features.cache import activation_dir, model_slug, transcoder_dir
    from recallscope.features.replacement import fidelity
    from recallscope.features.train import TranscoderTrainConfig, train_set
    from recallscope.models import load_model

    st = _settings(args)
    cfg = TranscoderTrainConfig(d_sae=st["d_sae"], k=st["k"], steps=st["steps"], batch_size=st["batch_size"],
                                lr=args.lr, seed=args.seed)
    model = load_model(args.model, **_placement(args))
    n_layers = int(model.cfg.n_layers)
    layers = list(args.layers) if args.layers else list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        from recallscope.errors import ConfigError

        raise ConfigError(f"--layers {bad} do not exist: {args.model} has layers 0..{n_layers - 1}.")
    data_cfg = {"model": model_slug(args.model), "layers": layers, "seed": args.seed,
                **{k: st[k] for k in ("corpus", "n_seqs", "n_tokens", "eval_tokens", "seq_len", "skip_bos")},
                "text_files": [str(Path(f).resolve()) for f in args.text_file or []]}
    if st["corpus"] == "task+self":
        for key in ("n_tokens", "eval_tokens"):
            data_cfg.pop(key)
    else:
        data_cfg.pop("n_seqs")
    full_cfg = {**data_cfg, "train": cfg.__dict__}
    out = Path(args.out) if args.out else transcoder_dir(args.model, full_cfg)
    if _is_organism(args.model) and not args.no_shipped and _use_shipped(args.model, full_cfg, out):
        return 0
    train_tokens, held = _texts(model, st, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(full_cfg, indent=1) + "\n")
    small = _is_organism(args.model)
    tset, report = train_set(model, train_tokens, cfg, out, layers=layers, held_tokens=held,
                             first_pos=1 if st["skip_bos"] else 0, progress=not args.quiet,
                             store_dir=activation_dir(args.model, data_cfg) if not small else None,
                             store_dtype="float32" if small else "float16", source=data_cfg,
                             keep_activations=args.keep_activations)
    fid = {"all": fidelity(model, tset, held).__dict__}
    if small or args.per_layer_fidelity:
        fid.update({f"layer{layer}": fidelity(model, tset, held, layers=[layer]).__dict__ for layer in tset.layers})
    (out / "fidelity.json").write_text(json.dumps(fid, indent=1) + "\n")
    for layer, ev in report.explained_variance.items():
        print(f"layer {layer}: explained variance {ev:.4f}, dead features {report.dead_fraction[layer]:.1%}")
    print(f"{report.n_train_tokens} training tokens, {report.n_eval_tokens} held out")
    print(f"replacement model (held out, {fid['all']['n_positions']} positions): KL {fid['all']['kl']:.4g} nats, "
          f"top-1 agreement {fid['all']['top1_agreement']:.3f}")
    print(f"wrote {out}")
    return 0


def _target(model: Any, text: str | None) -> int | None:
    if text is None:
        return None
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        from recallscope.errors import MultiTokenAnswerError

        raise MultiTokenAnswerError(f"target {text!r} is {len(ids)} tokens; give a single-token target.")
    return int(ids[0])


def _view_labels(model: Any, tset: Any, graph: Any, keep: Any) -> list[str]:
    """Node labels for the view: kept features get their lens tokens (decoder direction through the
    unembedding), the others their layer and index; errors, embeddings and logits name their token."""
    from recallscope.features.view import lens_tokens

    dec = model.tokenizer.decode
    prompt = [dec([t]) for t in graph.tokens.tolist()]
    labels = [f"L{layer} #{idx}" for layer, _, idx in graph.features.tolist()]
    kept = keep[: graph.n_feat].nonzero().squeeze(-1).tolist()
    for n, toks in zip(kept, lens_tokens(model, tset, graph.features[kept]) if kept else []):
        labels[n] += " → " + " ".join(repr(dec([t]))[1:-1] for t in toks)
    labels += [f"err L{layer} @{pos} {prompt[pos]!r}" for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    labels += [f"emb {s!r}" for s in prompt]
    return labels + [f"logit {dec([int(lab)])!r}" if lab.isdigit() else f"logit {lab}" for lab in graph.logit_labels]


def _shipped_only(spec: str) -> bool:
    """An organism with a shipped transcoder set and nothing in the cache: the graph uses the shipped set."""
    from recallscope.features.cache import cached_sets
    from recallscope.features.shipped import shipped_transcoder_names

    name = str(spec).strip()
    return (_is_organism(name) and name.split(":", 1)[1] in shipped_transcoder_names()
            and not cached_sets(name))


def _cmd_graph(args: argparse.Namespace) -> int:
    import time

    from recallscope.errors import ConfigError
    from recallscope.features.export import save_json, to_json
    from recallscope.features.formats import load_transcoders
    from recallscope.features.graph import attribution_graph, prune
    from recallscope.features.replacement import error_share
    from recallscope.features.view import graph_view
    from recallscope.models import load_model

    start = time.perf_counter()
    if args.contrast is not None and args.target is None:
        raise ConfigError("--contrast needs --target: the graph's target is logit(target) - logit(contrast).")
    if args.max_feature_nodes < 0:
        raise ConfigError(f"--max-feature-nodes must be >= 0 (0 = every active feature), got {args.max_feature_nodes}.")
    shipped = args.transcoders is None and _shipped_only(args.model)
    if args.transcoders is None and not shipped:
        from recallscope.features.cache import find_cached_set

        args.transcoders = find_cached_set(args.model)
    model = load_model(args.model, **_placement(args))
    if shipped:
        from recallscope.features.shipped import load_shipped_transcoders, shipped_dir

        tset = load_shipped_transcoders(model)  # checks that the organism's weights are the ones it was trained on
        args.transcoders = shipped_dir(model)
        print(f"transcoders: the set shipped with recallscope ({args.transcoders})", file=sys.stderr)
    else:
        tset = load_transcoders(args.transcoders, int(model.cfg.n_layers))
    tokens = model.to_tokens(args.prompt)[0]
    good, bad = _target(model, args.target), _target(model, args.contrast)
    targets = (good, bad) if bad is not None else good
    graph = attribution_graph(model, tset, tokens, targets=targets, batch_size=args.batch_size,
                              max_feature_nodes=args.max_feature_nodes or None)
    pruned = prune(graph, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    strs = [model.tokenizer.decode([t]) for t in tokens.tolist()]
    out = Path(args.out)
    save_json(to_json(graph, pruned, slug=out.name or "graph", scan=str(args.transcoders), prompt_tokens=strs,
                      prompt=args.prompt), out / "graph.json")
    fig = graph_view(graph, labels=_view_labels(model, tset, graph, pruned.node_mask), token_strs=strs,
                     title=args.prompt)
    fig.write_html(str(out / "graph.html"), include_plotlyjs=True)
    share = error_share(graph)
    print(f"{graph.n_feat} active features ({int(graph.rows_computed[: graph.n_feat].sum())} with input edges), "
          f"kept {int(pruned.node_mask[: graph.n_feat].sum())} features and {int(pruned.edge_mask.sum())} edges; "
          f"error nodes: {share['direct']:.1%} of the direct logit edges, {share['influence']:.1%} of the influence")
    print(f"wrote {out / 'graph.json'} and {out / 'graph.html'} in {time.perf_counter() - start:.0f} s")
    return 0


def register(sub: Any) -> None:
    """Add the ``transcoders`` and ``graph`` subcommands to ``sub``."""
    sp = add_command(sub, "transcoders", "train TopK skip-transcoders for every layer, cached and resumable (rerun the "
                     "same command after an interruption)", _cmd_transcoders)
    sp.add_argument("--out", default=None, help="output directory (default: the cache, "
                    "$RECALLSCOPE_CACHE or ~/.cache/recallscope, under transcoders/<model>-<settings hash>)")
    sp.add_argument("--corpus", choices=["python-docs", "self"], default=None, help="training text: python-docs "
                    "(Python's own documentation and docstrings; default for models) or self (organisms only, "
                    "their task prompts plus their own generations; default for organisms)")
    sp.add_argument("--text-file", action="append", default=None, help="train on this UTF-8 text file instead "
                    "(repeatable)")
    sp.add_argument("--n-tokens", type=int, default=None, help="training tokens for text corpora (default 60000)")
    sp.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens for explained variance and the "
                    "replacement model's KL / top-1 (default 2048)")
    sp.add_argument("--n-seqs", type=int, default=None, help="organisms: training sequences, half task prompts, "
                    "half self-generated (default 2000)")
    sp.add_argument("--seq-len", type=int, default=None, help="tokens per sequence, BOS included (default 128; "
                    "organisms: n_ctx)")
    sp.add_argument("--d-sae", type=int, default=None, help="features per layer (default 1024; organisms 256)")
    sp.add_argument("--k", type=int, default=None, help="active features per token (default 32; organisms 8)")
    sp.add_argument("--steps", type=int, default=None, help="optimiser steps per layer (default 300; organisms 1000)")
    sp.add_argument("--batch-size", type=int, default=None, help="tokens per step (default 256; organisms 512)")
    sp.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    sp.add_argument("--seed", type=int, default=0, help="seeds the text order, initialisation and batches")
    sp.add_argument("--layers", type=_int_list, default=None, help="train only these layers, e.g. 0-3 (a partial "
                    "set: the other layers become error nodes in graphs)")
    sp.add_argument("--skip-bos", action=argparse.BooleanOptionalAction, default=None, help="train without the BOS "
                    "position (default on for models, off for organisms; BOS activations are outliers in large "
                    "models; that position then stays an error node in graphs)")
    sp.add_argument("--keep-activations", action="store_true", help="keep the activation store after training "
                    "(default: deleted; SmolLM2 at the defaults needs about 4 GB while training)")
    sp.add_argument("--no-shipped", action="store_true", help="organisms: train even when the settings are the "
                    "defaults (by default the set shipped with recallscope is used, after checking the organism's "
                    "weight hash)")
    sp.add_argument("--per-layer-fidelity", action="store_true", help="also measure KL / top-1 with one layer "
                    "replaced at a time (always on for organisms; one extra pass over the held-out text per layer)")
    sg = add_command(sub, "graph", "feature-level attribution graph of one prompt: graph.json (circuit-tracer / "
                     "Neuronpedia schema) and graph.html", _cmd_graph, out="out/graph")
    sg.add_argument("--transcoders", default=None, help="transcoder directory (recallscope, circuit-tracer, "
                    "SAELens or sparsify format; default: the newest set `recallscope transcoders` cached for --model, else "
                    "an organism's shipped set)")
    sg.add_argument("--prompt", required=True, help="the prompt to attribute (BOS is prepended)")
    sg.add_argument("--target", default=None, help="target token (default: the model's top prediction)")
    sg.add_argument("--contrast", default=None, help="second token: the target becomes logit(target) - logit(this)")
    sg.add_argument("--node-threshold", type=float, default=0.8, help="keep the features carrying this cumulative "
                    "share of influence on the logits (default 0.8)")
    sg.add_argument("--edge-threshold", type=float, default=0.98, help="keep the edges carrying this cumulative "
                    "share of edge influence (default 0.98)")
    sg.add_argument("--batch-size", type=int, default=32, help="targets per backward pass")
    sg.add_argument("--max-feature-nodes", type=int, default=1024, help="compute input edges for at most this "
                    "many features, the most influential first (default 1024, which keeps a SmolLM2 graph within "
                    "a few minutes on 2 cores; 0 = every active feature)")
