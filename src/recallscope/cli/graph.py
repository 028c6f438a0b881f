"""recallscope transcoders / graph: train transcoders for a model, and draw a feature-level attribution graph."""

import argparse
import json
from pathlib import Path
from typing import Any

from recallscope.cli.common import _placement, add_command


def _cmd_transcoders(args: argparse.Namespace) -> int:
    from recallscope.features.data import training_tokens
    from recallscope.features.replacement import fidelity
    from recallscope.features.train import TranscoderTrainConfig, split_heldout, train_set
    from recallscope.models import load_model

    model = load_model(args.model, **_placement(args))
    tokens = training_tokens(model, args.n_seqs, seed=args.seed, seq_len=args.seq_len)
    cfg = TranscoderTrainConfig(d_sae=args.d_sae, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, seed=args.seed)
    tset, report = train_set(model, tokens, cfg, args.out, first_pos=1 if args.skip_bos else 0,
                             progress=not args.quiet)
    _, held = split_heldout(tokens, 0.1)
    fid = {"all": fidelity(model, tset, held).__dict__}
    fid.update({f"layer{layer}": fidelity(model, tset, held, layers=[layer]).__dict__ for layer in tset.layers})
    (Path(args.out) / "fidelity.json").write_text(json.dumps(fid, indent=1) + "\n")
    for layer, ev in report.explained_variance.items():
        print(f"layer {layer}: explained variance {ev:.4f}, dead features {report.dead_fraction[layer]:.1%}")
    print(f"replacement model (held out, {fid['all']['n_positions']} positions): KL {fid['all']['kl']:.4g} nats, "
          f"top-1 agreement {fid['all']['top1_agreement']:.3f}")
    print(f"wrote {args.out}")
    return 0


def _target(model: Any, text: str | None) -> int | None:
    if text is None:
        return None
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        from recallscope.errors import MultiTokenAnswerError

        raise MultiTokenAnswerError(f"target {text!r} is {len(ids)} tokens; give a single-token target.")
    return int(ids[0])


def _cmd_graph(args: argparse.Namespace) -> int:
    from recallscope.features.export import save_json, to_json
    from recallscope.features.formats import load_transcoders
    from recallscope.features.graph import attribution_graph, prune
    from recallscope.features.plot import graph_figure
    from recallscope.models import load_model

    model = load_model(args.model, **_placement(args))
    tset = load_transcoders(args.transcoders, int(model.cfg.n_layers))
    tokens = model.to_tokens(args.prompt)[0]
    good, bad = _target(model, args.target), _target(model, args.contrast)
    targets = (good, bad) if bad is not None else good
    if bad is not None and good is None:
        raise SystemExit("--contrast needs --target")
    graph = attribution_graph(model, tset, tokens, targets=targets, batch_size=args.batch_size,
                              max_feature_nodes=args.max_feature_nodes)
    pruned = prune(graph, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    strs = [model.tokenizer.decode([t]) for t in tokens.tolist()]
    out = Path(args.out)
    save_json(to_json(graph, pruned, slug=out.name or "graph", scan=str(args.transcoders), prompt_tokens=strs,
                      prompt=args.prompt), out / "graph.json")
    graph_figure(graph, pruned, token_strs=strs, title=args.prompt).write_html(str(out / "graph.html"))
    print(f"{graph.n_feat} active features, kept {int(pruned.node_mask[: graph.n_feat].sum())} features and "
          f"{int(pruned.edge_mask.sum())} edges; wrote {out / 'graph.json'} and {out / 'graph.html'}")
    return 0


def register(sub: Any) -> None:
    """Add the ``transcoders`` and ``graph`` subcommands to ``sub``."""
    sp = add_command(sub, "transcoders", "train TopK skip-transcoders for every layer (resumable: rerun the same "
                     "command after an interruption)", _cmd_transcoders, out="out/transcoders")
    sp.add_argument("--n-seqs", type=int, default=2000, help="training sequences (organisms: half task prompts, "
                    "half self-generated; other models: self-generated)")
    sp.add_argument("--seq-len", type=int, default=None, help="length of self-generated sequences (default n_ctx)")
    sp.add_argument("--d-sae", type=int, default=256, help="features per layer")
    sp.add_argument("--k", type=int, default=8, help="active features per token")
    sp.add_argument("--steps", type=int, default=1000, help="optimiser steps per layer")
    sp.add_argument("--batch-size", type=int, default=512, help="tokens per step")
    sp.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    sp.add_argument("--seed", type=int, default=0, help="seeds the text sampling, initialisation and batches")
    sp.add_argument("--skip-bos", action="store_true", help="train without the BOS position (its activations are "
                    "outliers in large models; the BOS position then shows up as error nodes in graphs)")
    sg = add_command(sub, "graph", "feature-level attribution graph of one prompt: graph.json (circuit-tracer / "
                     "Neuronpedia schema) and graph.html", _cmd_graph, out="out/graph")
    sg.add_argument("--transcoders", required=True, help="transcoder directory (recallscope, circuit-tracer, "
                    "SAELens or sparsify format)")
    sg.add_argument("--prompt", required=True, help="the prompt to attribute (BOS is prepended)")
    sg.add_argument("--target", default=None, help="target token (default: the model's top prediction)")
    sg.add_argument("--contrast", default=None, help="second token: the target becomes logit(target) - logit(this)")
    sg.add_argument("--node-threshold", type=float, default=0.8, help="keep the features carrying this cumulative "
                    "share of influence on the logits (default 0.8)")
    sg.add_argument("--edge-threshold", type=float, default=0.98, help="keep the edges carrying this cumulative "
                    "share of edge influence (default 0.98)")
    sg.add_argument("--batch-size", type=int, default=32, help="targets per backward pass")
    sg.add_argument("--max-feature-nodes", type=int, default=None, help="compute input edges for at most this "
                    "many features, the most influential first (default: all active features)")
