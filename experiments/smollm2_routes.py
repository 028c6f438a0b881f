"""Routes on SmolLM2 where the bridge is neither the input nor the output (issue 16, item 1).

Two query families, found programmatically, each judged by the family route verdict
(:func:`recallscope.routes.family.route_family_report`: held-out concept transplant of the bridge pairing
against the input-itself and answer-itself pairings) and, per query, by the single-query
:func:`recallscope.routes.route_report` (interchange mediation against competitor classes, 8 templates):

(i) **acronym continuations**: "The acronym VAT stands for Value Added" -> " Tax". Acronyms come from
    recallscope's lexicon and, when present, the shared bsdgames lists (read in place, never copied). A query
    is kept when SmolLM2's greedy next token is the expansion's last word (first token) and the acronym
    matters: replacing it by other acronyms of the list lowers log p(answer) by >= ``--min-input-effect`` nats.
    Bridge candidates: the whole expansion (" Value Added Tax") held at the acronym's position, and its first
    word; the answer (" Tax", every casing) and the acronym are competitors.
(ii) **two-hop facts**: "The Eiffel Tower is in a country whose capital is" -> " Paris", composed from the
    built-in entity facts (landmark / city / person -> country) and country facts (capital, currency,
    language). Kept when SmolLM2 answers the two-hop prompt (greedy) AND both single hops; dropped when the
    subject itself names the answer or a landmark's city is the answer (a one-hop shortcut). Bridge: the
    country. Also per query: EntRec (logit-lens log p of the bridge at the subject's last token, max over
    layers, and its percentile among the family's other bridges at the same site) and back-patching
    (Biran et al. 2024: best gain in log p(answer) from moving a later layer's state at the subject to an
    earlier layer).

Writes ``--out`` (default figures/routes_smollm2): ``summary.json`` (both families' verdicts and rows,
per-query tables), ``queries_*.tsv`` (the families, usable with ``recallscope routes --family``),
``family_*/`` (saved RouteFamilyReport) and ``family_*.html/png``, ``table_*.md`` (per-query tables).
Resumable: per-query results are cached in ``--out/cache``; rerunning skips finished work.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/smollm2_routes.py --threads 1
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from recallscope import load_model
from recallscope.manifest import atomic_write_text
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.routes.concepts import load_acronym_lexicon
from recallscope.routes.transplant import TransplantPair

SHARED_ACRONYMS = (Path("/work/shared/data/acronyms/acronyms.tsv"), Path("/work/shared/data/acronyms/acronyms_comp.tsv"))
ACRONYM_TEMPLATE = "The acronym {} stands for"
STOP = frozenset("a an and at by for from in of on or the to with".split())
TWO_HOP = {  # relation of hop 1 -> two-hop prompt prefix (the subject first, so the site comes early)
    "landmark_country": "The {} is in a country whose",
    "city_country": "The city of {} is in a country whose",
    "person_country": "{} was born in a country whose",
}
HOP2 = {"capital": "capital is", "currency": "currency is the", "official_language": "official language is"}


# ------------------------------------------------------------------------------------------ helpers
def next_logits(model, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """Last-position logits of each prompt (batched by token length)."""
    toks = [model.to_tokens(p)[0] for p in prompts]
    out = torch.zeros(len(prompts), int(model.cfg.d_vocab))
    stack = build_stack(model)
    with torch.no_grad():
        for n in sorted({len(t) for t in toks}):
            idx = [i for i, t in enumerate(toks) if len(t) == n]
            for k in range(0, len(idx), batch):
                chunk = idx[k:k + batch]
                logits, _ = run(stack, torch.stack([toks[i] for i in chunk]), read_pos=torch.tensor([n - 1]))
                out[chunk] = logits[:, -1].float()
    return out


def first_id(model, text: str) -> int:
    return int(model.to_tokens(text, prepend_bos=False)[0, 0])


def cached(cache: Path, key: str, fn):
    path = cache / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    atomic_write_text(path, json.dumps(value, indent=1, default=float))
    return value


# ------------------------------------------------------------------------------------------ (i) acronyms
def acronym_lexicon() -> dict[str, list[str]]:
    """Acronym -> expansions of >= 2 words whose initials spell the acronym (stop words may be skipped)."""
    lex: dict[str, list[str]] = {a: list(e) for a, e in load_acronym_lexicon().items()}
    for path in SHARED_ACRONYMS:  # the bsdgames lists, read in place (a few lines are space-separated: skipped)
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) == 2 and not line.startswith(("#", "$")):
                    lex.setdefault(parts[0].strip(), []).append(parts[1].strip())
    out: dict[str, list[str]] = {}
    for a, exps in lex.items():
        if not (2 <= len(a) <= 5 and a.isalpha() and a.isupper()):
            continue
        for e in exps:
            words = e.replace("-", " ").split()
            content = [w for w in words if w.lower() not in STOP]
            if len(words) >= 2 and all(w.isalpha() for w in words) and \
                    "".join(w[0] for w in content).upper() == a:
                out.setdefault(a, []).append(" ".join(w[:1].upper() + w[1:] for w in words))
    return out


def find_acronyms(model, min_effect: float, n_alt: int = 4) -> list[dict]:
    """Queries "The acronym X stands for W1 .. Wn-1" -> " Wn" that SmolLM2 completes and where X matters."""
    cands = []
    for a, exps in acronym_lexicon().items():
        for e in exps:
            words = e.split()
            prompt = f"{ACRONYM_TEMPLATE.format(a)} {' '.join(words[:-1])}"
            cands.append({"acronym": a, "expansion": e, "prompt": prompt, "last": words[-1]})
    logits = next_logits(model, [c["prompt"] for c in cands])
    kept = []
    for c, lg in zip(cands, logits):
        best = int(lg.argmax())
        for variant in (" " + c["last"], " " + c["last"].lower()):
            if first_id(model, variant) == best and len(model.to_tokens(variant, prepend_bos=False)[0]) >= 1:
                kept.append({**c, "answer": variant})
                break
    seen, out = set(), []
    for c in kept:  # one expansion per acronym
        if c["acronym"] not in seen:
            seen.add(c["acronym"])
            out.append(c)
    acronyms = [c["acronym"] for c in out]
    for i, c in enumerate(out):  # input effect: other acronyms in the same prompt
        alts = [acronyms[(i + k) % len(acronyms)] for k in range(1, n_alt + 1)]
        prompts = [c["prompt"].replace(f" {c['acronym']} ", f" {x} ", 1) for x in alts]
        lp = next_logits(model, [c["prompt"], *prompts]).log_softmax(-1)[:, first_id(model, c["answer"])]
        c["logp"] = float(lp[0])
        c["input_effect"] = float(lp[0] - lp[1:].mean())
    return [c for c in out if c["input_effect"] >= min_effect]


# ------------------------------------------------------------------------------------------ (ii) two-hop
def find_two_hop(model) -> list[dict]:
    from recallscope.tasks.entity_facts import load_entity_facts
    from recallscope.tasks.facts import load_builtin_facts

    country = {}
    for f in load_builtin_facts():
        if f.relation in HOP2:
            country.setdefault(f.subject, {})[f.relation] = (f.attribute, f.template.format(f.subject))
    city_of = {f.subject: f.attribute.strip() for f in load_builtin_facts() if f.relation == "landmark_city"}
    cands = []
    for f in load_entity_facts():
        bridge = f.attribute.strip()
        if f.relation not in TWO_HOP or bridge not in country:
            continue
        for rel, (answer, hop2) in country[bridge].items():
            if answer.strip().lower() in f.subject.lower() or city_of.get(f.subject, "") == answer.strip():
                continue  # the subject names the answer, or the landmark's city is it: a one-hop shortcut
            cands.append({"relation": f"{f.relation}+{rel}", "subject": f.subject, "bridge": " " + bridge,
                          "answer": answer, "prompt": TWO_HOP[f.relation].format(f.subject) + " " + HOP2[rel],
                          "hop1": f.template.format(f.subject), "hop1_answer": f.attribute, "hop2": hop2})
    ok = []
    lg = next_logits(model, [c["prompt"] for c in cands] + [c["hop1"] for c in cands] + [c["hop2"] for c in cands])
    n = len(cands)
    for i, c in enumerate(cands):
        hits = [int(lg[i].argmax()) == first_id(model, c["answer"]),
                int(lg[n + i].argmax()) == first_id(model, c["hop1_answer"]),
                int(lg[2 * n + i].argmax()) == first_id(model, c["answer"])]
        if all(hits):
            c["logp"] = float(lg[i].log_softmax(-1)[first_id(model, c["answer"])])
            ok.append(c)
    return ok


# ------------------------------------------------------------------------------------------ families
def family_pairs(kind: str, queries: list[dict]) -> list[TransplantPair]:
    if kind == "acronym":
        return [TransplantPair(q["prompt"], " " + q["acronym"], " " + q["expansion"], q["answer"]) for q in queries]
    return [TransplantPair(q["prompt"], (" " if q["prompt"].startswith("The") else "") + q["subject"], q["bridge"],
                           q["answer"]) for q in queries]


def write_tsv(path: Path, pairs: list[TransplantPair]) -> None:
    lines = ["prompt\tinput\tconcept\tanswer"] + [f"{p.prompt}\t{p.input_text}\t{p.concept}\t{p.answer}" for p in pairs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_family(model, kind: str, queries: list[dict], out: Path, args) -> dict:
    """The family verdict (saved RouteFamilyReport + figure); reloaded when already saved."""
    from recallscope.plotting import export_all
    from recallscope.routes.family import FamilyConfig, RouteFamilyReport, route_family_report
    from recallscope.routes.transplant import TransplantConfig

    pairs = family_pairs(kind, queries)
    write_tsv(out / f"queries_{kind}.tsv", pairs)
    target = out / f"family_{kind}"
    if (target / "result.json").is_file():
        report = RouteFamilyReport.load(target)
    else:
        extra = {"first word": [" " + q["expansion"].split()[0] for q in queries]} if kind == "acronym" else {}
        config = FamilyConfig(transplant=TransplantConfig(min_layer=1), layer_stride=args.layer_stride,
                              max_answer_variants=args.answer_variants)
        report = route_family_report(model, pairs, candidates=extra, config=config, name=kind, progress=True)
        report.save(target)
    export_all(report.plot(), out / f"family_{kind}")
    return report.summary()


# ------------------------------------------------------------------------------------------ per query
def query_report(model, kind: str, q: dict, others: list[dict], args) -> dict:
    """route_report for one query (8 templates), the bridge candidates against every competitor class."""
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    config = RouteConfig(n_templates=8, n_alternatives=2, n_controls=0, n_random=2, n_neighbours=2,
                         stride=args.route_stride, ablation=False, max_output_tokens=1)
    if kind == "acronym":
        inp = " " + q["acronym"]
        n_tok = model.to_tokens(inp, prepend_bos=False).shape[1]
        alts = [" " + o["acronym"] for o in others
                if model.to_tokens(" " + o["acronym"], prepend_bos=False).shape[1] == n_tok][:2]
        words = [w for w in q["expansion"].split()[:-1] if w.lower() not in STOP]
        concepts = [" " + q["expansion"]] + [" " + w.lower() for w in dict.fromkeys(words)]
    else:
        inp = (" " if q["prompt"].startswith("The") else "") + q["subject"]
        alts = []
        concepts = [q["bridge"]]
    query = RouteQuery((q["prompt"],), inp, q["answer"], alternatives=tuple(alts), name=q["prompt"])
    report = route_report(model, query, concepts, config=config, progress=False)
    rows = report.routes()
    best = max(rows, key=lambda r: r.score)
    inputs = [r for r in report.competitor_rows() if "input" in r.source or r.name.strip() == inp.strip()]
    return {"verdict": report.verdict(), "total_effect": float(report.total_effect.nanmean()),
            "winner": best.name, "winner_verdict": best.verdict, "score": best.score, "p_holm": best.p_holm,
            "margins": best.margins, "mediated": best.mediation,
            "candidates": [{"name": r.name, "verdict": r.verdict, "score": r.score, "mediated": r.mediation,
                            "margins": r.margins} for r in rows],
            "input_mediated": max((r.mediation for r in inputs), default=float("nan"))}


def subject_pos(model, q: dict) -> int:
    end = q["prompt"].find(q["subject"]) + len(q["subject"])
    return model.to_tokens(q["prompt"][:end]).shape[1] - 1


def entrec_and_backpatch(model, q: dict, bridges: list[str]) -> dict:
    """EntRec (logit lens at the subject's last token) of the bridge and of the other bridges; back-patching."""
    from recallscope.lens.backpatch import backpatch
    from recallscope.lens.trajectory import entrec

    pos = subject_pos(model, q)
    own = entrec(model, q["prompt"], q["bridge"])[:, pos]
    others = torch.stack([entrec(model, q["prompt"], b)[:, pos].max() for b in bridges if b != q["bridge"]])
    bp = backpatch(model, q["prompt"], q["answer"], position=pos).best()
    return {"entrec_max_logp": float(own.max()), "entrec_layer": int(own.argmax()),
            "entrec_percentile": float((others < own.max()).float().mean()),
            "backpatch_gain": bp["gain"], "backpatch_src": bp["src"], "backpatch_dst": bp["dst"]}


# ------------------------------------------------------------------------------------------ tables
def table(kind: str, queries: list[dict], family: dict) -> str:
    fam = {r["name"]: r for r in family["rows"]}
    cand = fam.get("concept", {})
    head = (f"Family verdict ({kind}, {family['n_pairs']} queries, held-out transplant): **{family['verdict']}**; "
            f"bridge pairing: transplant {cand.get('transplant_verdict')}, score {cand.get('score', float('nan')):+.3f} "
            f"at layer {cand.get('layer')}, margins {json.dumps({k: round(v, 3) for k, v in cand.get('margins', {}).items()})}"
            f"; ceiling (another query's own site state) by layer {family['ceiling_by_layer']}"
            f"{'' if family.get('site_sufficient') else ' -- below 0.5 everywhere: the site alone never sets the answer'}"
            "\n\n")
    cols = ["query", "answer", "verdict (route_report)", "winning concept", "score", "margin: input", "margin: output",
            "margin: neighbour", "margin: random", "mediated share", "input itself: mediated", "TE (nats)"]
    if kind == "two_hop":
        cols += ["EntRec max log p (layer)", "EntRec pct among bridges", "back-patch gain (src->dst)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for q in queries:
        r = q.get("route", {})
        m = r.get("margins", {})
        f = lambda v: "-" if v is None or v != v else f"{v:+.3f}"  # noqa: E731
        row = [q["prompt"], repr(q["answer"]), r.get("verdict", "-"), r.get("winner", "-"), f(r.get("score")),
               f(m.get("input")), f(m.get("output")), f(m.get("neighbour")), f(m.get("random")), f(r.get("mediated")),
               f(r.get("input_mediated")), f(r.get("total_effect"))]
        if kind == "two_hop":
            e = q.get("lens", {})
            row += [f"{f(e.get('entrec_max_logp'))} ({e.get('entrec_layer', '-')})", f(e.get("entrec_percentile")),
                    f"{f(e.get('backpatch_gain'))} ({e.get('backpatch_src', '-')}->{e.get('backpatch_dst', '-')})"]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return head + "\n".join(lines) + "\n"


def select(kind: str, found: list[dict], args) -> list[dict]:
    """Acronyms: one per answer word (distinct answers), strongest input effect first. Two-hop: one hop-2
    relation (``--two-hop-relation``), without queries whose answer contains the bridge (Chichen Itza -> Mexico ->
    " Mexico City": the bridge would be the answer itself, and route_family_report files a pairing in which any
    concept is its pair's answer as a competitor)."""
    if kind == "acronym":
        seen, out = set(), []
        for q in sorted(found, key=lambda q: -q["input_effect"]):
            if q["answer"].strip().lower() not in seen:
                seen.add(q["answer"].strip().lower())
                out.append(q)
        return out[: args.max_queries]
    return [q for q in found if q["relation"].endswith("+" + args.two_hop_relation)
            and q["bridge"].strip().lower() not in q["answer"].lower()][: args.max_queries]  # Mexico -> Mexico City


def write_summary(out: Path, summary: dict, kinds, families: dict, queries: dict, t0: float) -> None:
    for kind in kinds:
        if kind in families:
            atomic_write_text(out / f"table_{kind}.md", table(kind, queries[kind], families[kind]))
            summary["families"][kind] = {"n_queries": len(queries[kind]), "family": families[kind],
                                         "queries": queries[kind]}
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="figures/routes_smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["acronym", "two_hop"], help="one family only")
    ap.add_argument("--max-queries", type=int, default=20, help="queries per family (default 20)")
    ap.add_argument("--two-hop-relation", default="capital", choices=sorted(HOP2), help="the two-hop family's hop 2")
    ap.add_argument("--min-input-effect", type=float, default=1.0,
                    help="acronyms: the acronym must raise log p(answer) by this many nats over other acronyms")
    ap.add_argument("--layer-stride", type=int, default=7,
                    help="family transplant: every k-th layer from 1 (default 7: 1, 8, 15, 22, 29)")
    ap.add_argument("--answer-variants", type=int, default=2, help="answer-itself pairings (casings)")
    ap.add_argument("--route-stride", type=int, default=14,
                    help="route_report: layer spacing of the interchange windows (default 14: layers 0, 14, 28)")
    ap.add_argument("--route-queries", type=int, default=20, help="route_report on the first N queries of each family")
    ap.add_argument("--skip-route-report", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, t0 = Path(args.out), time.time()
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2")
    summary: dict = {"command": "python experiments/smollm2_routes.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v not in (None, False)), "families": {}}
    found = {"acronym": lambda: find_acronyms(model, args.min_input_effect), "two_hop": lambda: find_two_hop(model)}
    kinds = ["acronym", "two_hop"] if args.only is None else [args.only]
    families, queries = {}, {}
    for kind in kinds:  # stage 1: the queries and the family verdicts
        queries[kind] = select(kind, cached(cache, f"queries_{kind}", found[kind]), args)
        families[kind] = run_family(model, kind, queries[kind], out, args)
        write_summary(out, summary, kinds, families, queries, t0)
    # stage 2: per query, interleaving the families: route_report (first --route-queries of each family) and, for
    # two-hop queries, EntRec and back-patching; every result is cached, so an interrupted run resumes here
    n = max(len(queries[k]) for k in kinds)
    order = [(k, i) for i in range(n) for k in kinds if i < len(queries[k])]
    for kind, i in tqdm(order, desc="per query"):
        q = queries[kind][i]
        key = f"{kind}_{q.get('acronym') or q['subject']}_{q.get('relation', '')}".replace(" ", "_")
        if not args.skip_route_report and i < args.route_queries:
            q["route"] = cached(cache, f"route_{key}", lambda: query_report(model, kind, q, queries[kind], args))
        if kind == "two_hop":
            bridges = sorted({x["bridge"] for x in queries[kind]})
            q["lens"] = cached(cache, f"lens_{key}", lambda: entrec_and_backpatch(model, q, bridges))
        write_summary(out, summary, kinds, families, queries, t0)
    print(f"done in {time.time() - t0:.0f} s; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
