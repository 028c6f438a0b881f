"""Does SmolLM2 learn a decode faster when a concept it knows links the chunk to the answer? A powered test.

The question (issue 16, item 3): a human may remember base64 ``VA==`` -> ``T`` through "VAT". Does a
pretrained model learn decode(chunk) faster when such a hook exists? Real base64 hooks are few
(``find_b64_hooks.py``), so the powered test uses a code with hooks the experimenter controls
(:mod:`recallscope.tasks.acronym_code`): chunk = an acronym SmolLM2 expands, without its last letter;
answer = that letter, the initial of the expansion's last word (VA -> T via "Value Added Tax"). Each
hooked item has a control: a chunk of the same length and prompt token count, letters drawn from the hooked
chunks' letter frequencies, with the same answer, where chunk + answer is no acronym and no word.

Stages (``--stage``), all configured by the pre-registration ``experiments/finetune_prereg.toml``:

1. ``items``: the knowledge checks (known acronyms; base64 hooks from ``OUT/hooks.json``) and the item
   sets (confirmatory controls, pilot controls, base64 items) -> ``OUT/items.json``.
2. ``pilot``: one training seed on the pilot item set (its own controls and seed, not confirmatory data);
   the simulation-based power analysis -> ``OUT/pilot.json``.
3. ``confirm``: every pre-registered seed on the confirmatory items (plus the base64 items) -> per-seed
   curves (checkpointed, resumable) in ``--work``, then ``OUT/summary.json`` (primary metric, CI, p,
   secondaries, manifest) and the learning-curve figure ``OUT/learning_curves.{html,png}``.

Training (:mod:`recallscope.finetune.curves`): all items at once (full batch), LoRA adapters on the
layers from ``from_layer`` up, the frozen lower layers run once (:mod:`recallscope.finetune.trunk`), AdamW
on the mean cross-entropy of the answer token; every item's log p(answer) is recorded before each update.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/find_b64_hooks.py --out figures/finetune
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/finetune_smollm2_b64.py --stage items
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/finetune_smollm2_b64.py --stage pilot
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python experiments/finetune_smollm2_b64.py --stage confirm [--threads 2]

``--scale gpu --device cuda`` runs the bigger pre-registered version (adapters on every layer, 10 seeds).
"""

import argparse
import json
import os
import string
import sys
import time
import tomllib
from dataclasses import asdict
from pathlib import Path

import torch

from recallscope.errors import ConfigError
from recallscope.finetune.curves import Curve, TrainConfig, learning_curve
from recallscope.finetune.knowledge import left_pad, pad_id
from recallscope.finetune.stats import (bootstrap_ci, curve_auc, minimum_detectable_effect, pair_differences,
                                        power_by_simulation, sign_flip_test)
from recallscope.finetune.trunk import cache_trunk
from recallscope.manifest import atomic_write_text, prompts_hash, versions, weights_hash
from recallscope.tasks.acronym_code import code_items, known_acronyms, prompt_length, read_lexicons
from recallscope.tasks.b64_codec import encode
from recallscope.tasks.b64_hooks import vocabulary_words

sys.path.insert(0, str(Path(__file__).resolve().parent))
from find_b64_hooks import SHARED_LEXICONS, hf_smollm2, lexicon_paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREREG = ROOT / "experiments" / "finetune_prereg.toml"
TRAIN_KEYS = ("steps", "lr", "rank", "alpha", "from_layer", "checkpoint_every")


def load_prereg(path: Path, scale: str) -> tuple[dict, TrainConfig, list[int]]:
    """The pre-registration, the scale's TrainConfig and seeds; SystemExit naming the problem on bad input."""
    try:
        prereg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read the pre-registration ({exc}).") from exc
    for section in ("design", "analysis", "pilot", "scale"):
        if section not in prereg:
            raise SystemExit(f"{path}: missing [{section}]; see the committed finetune_prereg.toml.")
    if scale not in prereg["scale"]:
        raise SystemExit(f"{path}: no [scale.{scale}]; scales are {sorted(prereg['scale'])}.")
    block = prereg["scale"][scale]
    unknown = set(block) - set(TRAIN_KEYS) - {"seeds"}
    if unknown or "seeds" not in block or not block["seeds"]:
        raise SystemExit(f"[scale.{scale}]: unknown keys {sorted(unknown)} or no seeds; allowed: seeds, {TRAIN_KEYS}.")
    try:
        config = TrainConfig(**{k: block[k] for k in TRAIN_KEYS if k in block})
    except (ConfigError, TypeError) as exc:
        raise SystemExit(f"[scale.{scale}]: {exc}") from exc
    return prereg, config, [int(s) for s in block["seeds"]]


# ------------------------------------------------------------------------------------------------ items
def b64_items(hooks: dict, tok, template: str) -> list[dict]:
    """Base64 items: every canonical XY== chunk with a candidate hook word (known or not: the strict knowledge
    check passes for none, see hooks.json), and a control XY== chunk without any candidate word, with the same
    prompt token count and a single-token answer (the first such chunk whose byte is a letter, else a digit)."""
    cands = [r for r in hooks["candidates"] if r["canonical_2"]]
    best = {}
    for r in sorted(cands, key=lambda r: r["best_logp_rest"]):
        best[r["chunk"]] = r  # the candidate word with the highest log-prob wins
    words = {r["chunk"] for r in hooks["candidates"]}
    pool = [encode(c)[:2] for c in string.ascii_uppercase + string.ascii_lowercase + string.digits]
    out, used = [], set(best)
    for pair, chunk in enumerate(sorted(best)):
        target = prompt_length(tok, chunk + "==", template)
        for cand in pool:
            ans = encode_answer(cand)
            if (cand in used or cand in words or prompt_length(tok, cand + "==", template) != target
                    or len(tok.encode(ans, add_special_tokens=False)) != 1):
                continue
            used.add(cand)
            out.append({"chunk": chunk + "==", "answer": encode_answer(chunk), "group": "hooked", "pair": pair,
                        "hook": best[chunk]["word"], "hook_known": best[chunk]["known"],
                        "hook_logp_rest": best[chunk]["best_logp_rest"], "code": "base64"})
            out.append({"chunk": cand + "==", "answer": ans, "group": "control", "pair": pair, "hook": "",
                        "code": "base64"})
            break
    return out


def encode_answer(chunk2: str) -> str:
    from recallscope.tasks.b64_codec import decode

    return decode(chunk2 + "==").decode("latin-1")


def stage_items(args, prereg: dict, model, tok) -> None:
    design = prereg["design"]
    hooks_path = Path(args.out) / "hooks.json"
    if not hooks_path.is_file():
        raise SystemExit(f"{hooks_path} is missing: run experiments/find_b64_hooks.py --out {args.out} first.")
    hooks = json.loads(hooks_path.read_text())
    lexicon = read_lexicons(lexicon_paths(args.lexicon))
    t0 = time.perf_counter()
    known = known_acronyms(model, tok, lexicon, lengths=tuple(design["acronym_lengths"]))
    b64 = b64_items(hooks, tok, design["b64_template"])
    exclude = {it["chunk"][:2] for it in b64}
    vocab = set(vocabulary_words(tok))
    sets = {}
    for name, cseed in (("confirm", design["control_seed"]), ("pilot", prereg["pilot"]["control_seed"])):
        sets[name] = [asdict(i) for i in code_items(known, tok, lexicon, vocab_words=vocab, seed=cseed,
                                                    exclude_chunks=exclude, template=design["code_template"])]
    n_pairs = len(sets["confirm"]) // 2
    payload = {"n_known_acronyms": len(known), "n_pairs": n_pairs, "known_acronyms": [asdict(k) for k in known],
               "confirm": sets["confirm"], "pilot": sets["pilot"], "base64": b64,
               "lexicons": [str(p) for p in lexicon_paths(args.lexicon)], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(Path(args.out) / "items.json", json.dumps(payload, indent=1))
    print(f"{len(known)} known acronyms -> {n_pairs} hooked/control pairs; {len(b64) // 2} base64 pairs")


def load_items(out: Path, which: str, min_pairs: int) -> list[dict]:
    path = out / "items.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run --stage items first.")
    data = json.loads(path.read_text())
    items = data[which] + (data["base64"] if which == "confirm" else [])
    n = sum(1 for i in data[which] if i["group"] == "hooked")
    if n < min_pairs:
        raise SystemExit(f"only {n} hooked/control pairs in {path} ({which}); the pre-registration needs {min_pairs}.")
    return items


def encode_items(tok, items: list[dict], prereg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    templates = {"acronym": prereg["design"]["code_template"], "base64": prereg["design"]["b64_template"]}
    prompts = [templates[i["code"]].format(i["chunk"]) for i in items]
    answers = [tok.encode(i["answer"], add_special_tokens=False) for i in items]
    bad = [i["answer"] for i, a in zip(items, answers) if len(a) != 1]
    if bad:
        raise SystemExit(f"answers {bad} are not single tokens; drop them from the item set.")
    ids, mask = left_pad([tok.encode(p, add_special_tokens=False) for p in prompts], pad_id(tok))
    return ids, mask, torch.tensor([a[0] for a in answers]), prompts


# --------------------------------------------------------------------------------------------- training
def train_seeds(model, trunk, answers, config: TrainConfig, seeds: list[int], work: Path, tag: str) -> list[Curve]:
    """One learning curve per seed; a finished seed is loaded from ``work`` instead of retrained."""
    work.mkdir(parents=True, exist_ok=True)
    curves = []
    for seed in seeds:
        done = work / f"{tag}_seed{seed}_{config.key(seed, len(answers))}.pt"
        if done.is_file():
            saved = torch.load(done, weights_only=False)
            curves.append(Curve(saved["logp"], saved["top1"], seed, saved.get("adapters", {})))
            print(f"seed {seed}: loaded {done}", flush=True)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        curve = learning_curve(model, trunk, answers, config, seed=seed, checkpoint=done.with_suffix(".ckpt"))
        torch.save({"logp": curve.logp, "top1": curve.top1, "adapters": curve.adapters, "wall_s": time.perf_counter() - t0,
                    "cpu_s": time.process_time() - c0}, done)
        done.with_suffix(".ckpt").unlink(missing_ok=True)
        curves.append(curve)
    return curves


def steps_to_top1(top1: torch.Tensor) -> torch.Tensor:
    """First step from which each item's answer stays top-1 (``steps + 1`` if never)."""
    stays = torch.flip(torch.cumprod(torch.flip(top1.int(), [0]), 0), [0]).bool()
    return torch.where(stays.any(0), stays.int().argmax(0), torch.tensor(top1.shape[0])).float()


def paired_test(values: torch.Tensor, items: list[dict], analysis: dict) -> dict:
    """Mean paired difference of per-(seed, item) ``values``, its CI and sign-flip p, over acronym pairs."""
    sel = [k for k, i in enumerate(items) if i["code"] == "acronym"]
    pair = torch.tensor([items[k]["pair"] for k in sel])
    hooked = torch.tensor([items[k]["group"] == "hooked" for k in sel])
    diff = pair_differences(values[:, sel], pair, hooked)
    lo, hi = bootstrap_ci(diff, n_boot=analysis["n_boot"], seed=analysis["stat_seed"])
    return {"mean_diff": float(diff.mean()), "ci95": [lo, hi], "p": sign_flip_test(diff, n_perm=analysis["n_perm"],
            seed=analysis["stat_seed"]), "n_pairs": len(diff), "sd_diff": float(diff.std()),
            "hooked_mean": float(values[:, sel][:, hooked].mean()),
            "control_mean": float(values[:, sel][:, ~hooked].mean()), "pair_diffs": diff.tolist()}


def analyse(curves: list[Curve], items: list[dict], analysis: dict) -> dict:
    logp = torch.stack([c.logp for c in curves])  # [seed, step, item]
    auc = torch.stack([curve_auc(c.logp) for c in curves])  # [seed, item]
    out = {"primary": paired_test(auc, items, analysis),
           "gain_area": paired_test(auc - logp[:, 0], items, analysis),
           "step0_logp": paired_test(logp[:, 0], items, analysis),
           "steps_to_top1": paired_test(torch.stack([steps_to_top1(c.top1) for c in curves]), items, analysis)}
    out["base64_items"] = [{**i, "auc_by_seed": auc[:, k].tolist(), "logp0": float(logp[:, 0, k].mean()),
                            "logp_final": float(logp[:, -1, k].mean())}
                           for k, i in enumerate(items) if i["code"] == "base64"]
    return out


# --------------------------------------------------------------------------------------------- stages
def manifest(model, prompts, config, seeds, prereg_path: Path, t0: float, c0: float, threads: int) -> dict:
    import subprocess

    commit = subprocess.run(["git", "log", "-1", "--format=%H %cI", "--", str(prereg_path)], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantised, float32)", "weights_sha256": weights_hash(model),
            "prompts_sha256": prompts_hash(prompts), "n_prompts": len(prompts), "config": asdict(config),
            "seeds": seeds, "prereg": str(prereg_path.relative_to(ROOT)), "prereg_last_commit": commit,
            "versions": versions(), "threads": threads, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1), "loadavg_end": os.getloadavg()}


def stage_pilot(args, prereg, config) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    model, items, answers, prompts, trunk = _ready(args, prereg, config, "pilot")
    pilot = prereg["pilot"]
    curves = train_seeds(model, trunk, answers, config, [pilot["seed"]], Path(args.work), "pilot")
    result = analyse(curves, items, prereg["analysis"])
    n_confirm = sum(1 for i in load_items(Path(args.out), "confirm", 0) if i["code"] == "acronym") // 2
    diff = torch.tensor(result["primary"]["pair_diffs"])
    power = power_by_simulation(diff, n_pairs=n_confirm, effects=list(pilot["effects"]), alpha=prereg["analysis"]["alpha"],
                                n_sim=pilot["n_sim"], n_perm=pilot["n_perm"], seed=prereg["analysis"]["stat_seed"])
    out = {"pilot": result, "power": {"n_pairs_confirm": n_confirm, "alpha": prereg["analysis"]["alpha"],
           "by_effect": {str(k): v for k, v in power.items()}, "mde_80": minimum_detectable_effect(power),
           "method": "resample the pilot's centred pair differences (1 seed) to n_pairs, add the effect, "
                     "sign-flip test; conservative: the confirmatory pair differences average 3+ seeds"},
           "manifest": manifest(model, prompts, config, [pilot["seed"]], Path(args.prereg), t0, c0, args.threads)}
    atomic_write_text(Path(args.out) / "pilot.json", json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out["pilot"]["primary"].items() if k != "pair_diffs"}))
    print(json.dumps(out["power"]))


def _ready(args, prereg, config, which):
    model, tok = hf_smollm2()
    model.to(args.device)
    model.recallscope_tokenizer = tok
    items = load_items(Path(args.out), which, prereg["design"]["min_pairs"])
    ids, mask, answers, prompts = encode_items(tok, items, prereg)
    trunk = cache_trunk(model, ids.to(args.device), mask.to(args.device), config.from_layer)
    return model, items, answers.to(args.device), prompts, trunk


def save_finetuned(model, tok, config: TrainConfig, curve: Curve, out_dir: Path) -> None:
    """Merge one seed's adapters into the model and save a Hugging Face directory (``load_model(out_dir)`` reads it)."""
    from recallscope.finetune.lora import attach_lora, load_lora_state, merge_lora
    from recallscope.finetune.trunk import decoder

    if not curve.adapters:
        raise SystemExit(f"seed {curve.seed}'s saved curve has no adapters (written before they were kept); "
                         "delete its .pt file under --work to retrain it, then save.")
    attach_lora(model, decoder(model).layers[config.from_layer:], config.targets, rank=config.rank,
                alpha=config.alpha, seed=curve.seed)
    load_lora_state(model, curve.adapters)
    merge_lora(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"seed {curve.seed}: fine-tuned model saved to {out_dir}")


def check_items_hash(path: Path, prereg: dict) -> None:
    """The confirmatory items must be the pre-registered ones (``[sample] items_sha256``)."""
    import hashlib

    want = prereg.get("sample", {}).get("items_sha256")
    if want is None:
        return
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
        raise SystemExit(f"{path} (sha256 {got[:12]}...) is not the pre-registered item set ({want[:12]}...); "
                         "restore the committed items.json or pre-register the new one before a confirmatory run.")


def stage_confirm(args, prereg, config, seeds) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()
    check_items_hash(Path(args.out) / "items.json", prereg)
    model, items, answers, prompts, trunk = _ready(args, prereg, config, "confirm")
    curves = train_seeds(model, trunk, answers, config, seeds, Path(args.work) / args.scale, "confirm")
    summary = {"question": "does SmolLM2 learn decode(chunk) faster when a known concept links chunk and answer?",
               **analyse(curves, items, prereg["analysis"]), "alpha": prereg["analysis"]["alpha"],
               "scale": args.scale, "items": items, "loadavg_start": load0,
               "manifest": manifest(model, prompts, config, seeds, Path(args.prereg), t0, c0, args.threads)}
    summary["primary"]["metric"] = prereg["analysis"]["primary_metric"]
    summary["primary"]["test"] = prereg["analysis"]["test"]
    atomic_write_text(Path(args.out) / f"summary{'' if args.scale == 'default' else '_' + args.scale}.json",
                      json.dumps(summary, indent=1))
    torch.save({"logp": torch.stack([c.logp for c in curves]), "seeds": seeds},
               Path(args.work) / args.scale / "curves.pt")
    figure(curves, items, Path(args.out) / "learning_curves")
    if args.save_model:
        save_finetuned(model, model.recallscope_tokenizer, config, curves[0], Path(args.save_model))
    p = summary["primary"]
    print(f"primary: hooked - control area {p['mean_diff']:.3f} nats, 95% CI [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}],"
          f" p = {p['p']:.4g}, {p['n_pairs']} pairs, {len(seeds)} seeds")


def figure(curves: list[Curve], items: list[dict], stem: Path) -> None:
    import plotly.graph_objects as go

    from recallscope.plotting import apply_style, export_all

    logp = torch.stack([c.logp for c in curves]).mean(0)  # [step, item], mean over seeds
    fig = go.Figure()
    for code, group, dash in (("acronym", "hooked", "solid"), ("acronym", "control", "dot"),
                              ("base64", "hooked", "dash"), ("base64", "control", "dashdot")):
        sel = [k for k, i in enumerate(items) if i["code"] == code and i["group"] == group]
        if not sel:
            continue
        y = logp[:, sel]
        mean, se = y.mean(1), y.std(1) / len(sel) ** 0.5
        fig.add_trace(go.Scatter(y=mean.tolist(), mode="lines", name=f"{code} {group} (n={len(sel)})",
                                 line=dict(dash=dash),
                                 error_y=dict(type="data", array=(1.96 * se).tolist(), visible=True, thickness=0.5)))
    apply_style(fig, title="SmolLM2 + LoRA: mean log p(answer) per step (mean over seeds; bars: 95% CI over items)")
    fig.update_xaxes(title="training step")
    fig.update_yaxes(title="log p(answer)")
    export_all(fig, stem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("items", "pilot", "confirm"), default="confirm")
    ap.add_argument("--scale", default="default", help="a [scale.NAME] of the pre-registration: default or gpu")
    ap.add_argument("--prereg", default=str(PREREG))
    ap.add_argument("--out", default=str(ROOT / "figures" / "finetune"))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "recallscope" / "finetune"),
                    help="per-seed curves and checkpoints (a rerun resumes from them)")
    ap.add_argument("--lexicon", nargs="*", default=list(SHARED_LEXICONS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--save-model", default=None,
                    help="after --stage confirm: merge the first seed's adapters and save a Hugging Face directory here "
                         "(for the route analysis of the fine-tuned model)")
    args = ap.parse_args()
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prereg, config, seeds = load_prereg(Path(args.prereg), args.scale)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.stage == "items":
        model, tok = hf_smollm2()
        stage_items(args, prereg, model, tok)
    elif args.stage == "pilot":
        stage_pilot(args, prereg, config)
    else:
        stage_confirm(args, prereg, config, seeds)


if __name__ == "__main__":
    main()
