"""One vocabulary across methods: metric names (metrics.resolve), statistics (stats), site labels."""

import math

import pytest
import torch

from recallscope import metrics as M
from recallscope import stats
from recallscope.errors import ConfigError
from recallscope.tasks.pairs import PromptPair, tokenize_pairs

ANSWER, WRONG = torch.tensor([3, 1]), torch.tensor([0, 2])


class _Pairs:
    answer, wrong = ANSWER, WRONG


def test_resolve_binds_every_name_to_the_answers():
    logits = torch.randn(2, 1, 5)
    for name in M.NAMES:
        metric = M.resolve(name, _Pairs())
        assert metric.name == name and metric.read_positions(4) == [3]
    torch.testing.assert_close(M.resolve("logit", _Pairs())(logits), logits[[0, 1], -1, [3, 1]])
    torch.testing.assert_close(M.resolve("logit_diff", _Pairs())(logits),
                               logits[[0, 1], -1, [3, 1]] - logits[[0, 1], -1, [0, 2]])
    torch.testing.assert_close(M.resolve("prob", ANSWER)(logits), logits[:, -1].softmax(-1)[[0, 1], [3, 1]])
    obj = M.LogitDiff(ANSWER, WRONG)
    assert M.resolve(obj, _Pairs()) is obj


def test_resolve_errors_name_the_choices():
    with pytest.raises(ConfigError, match=r"unknown metric 'kl_div' for x; use one of 'logit_diff', 'logit'") as e:
        M.resolve("kl_div", _Pairs(), method="x")
    assert "*[" not in str(e.value)
    with pytest.raises(ConfigError, match=r"'logit' exists but attention_knockout cannot use it.*'prob', 'logprob'"):
        M.resolve("logit", ANSWER, allowed=("prob", "logprob"), method="attention_knockout")
    with pytest.raises(ConfigError, match="needs a wrong answer"):
        M.resolve("logit_diff", ANSWER)
    with pytest.raises(ConfigError, match="metric name .* or a metric object"):
        M.resolve(5, ANSWER)
    with pytest.raises(ConfigError, match="supports the metrics 'logit_diff', 'logit', not a Prob"):
        M.resolve(M.Prob(ANSWER), ANSWER, allowed=("logit_diff", "logit"))


def test_every_method_resolves_metric_names_the_same_way(tiny_gpt2):
    from recallscope.attribution import atp
    from recallscope.attribution.dla import direct_logit_attribution
    from recallscope.patching import activation_patching, attention_knockout, causal_trace

    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid",
                        spans={"subject": (4, 5)})]
    calls = {
        "activation_patching": lambda m: activation_patching(tiny_gpt2, pairs, m, layers=[0], progress=False),
        "attribution": lambda m: atp(tiny_gpt2, pairs, m, progress=False),
        "direct logit attribution": lambda m: direct_logit_attribution(tiny_gpt2, pairs, m),
        "attention_knockout": lambda m: attention_knockout(tiny_gpt2, pairs, metric=m, progress=False),
        "causal_trace": lambda m: causal_trace(tiny_gpt2, pairs, metric=m, n_samples=1, progress=False),
    }
    for method, call in calls.items():
        with pytest.raises(ConfigError, match=f"unknown metric 'nope' for {method}"):
            call("nope")
    tp = tokenize_pairs(tiny_gpt2, pairs)
    dla = direct_logit_attribution(tiny_gpt2, pairs, "logit")
    assert dla.config["metric"] == "logit"
    torch.testing.assert_close(dla.total, M.resolve("logit", tp)(tiny_gpt2(tp.clean)[:, -1:].float()), atol=1e-4,
                               rtol=1e-4)
    trace = causal_trace(tiny_gpt2, pairs, metric="logprob", n_samples=2, progress=False)
    assert trace.config["metric"] == "logprob" and bool((trace.clean <= 0).all())  # log-probs, not probs


def test_ranks_average_ties():
    torch.testing.assert_close(stats.ranks(torch.tensor([10.0, 20.0, 10.0, 5.0])),
                               torch.tensor([2.5, 4.0, 2.5, 1.0], dtype=torch.float64))


def test_spearman_with_ties_matches_the_textbook_formula_and_skips_non_finite():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # Pearson r of average ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4)
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]) - 2.5, torch.tensor([1.0, 2, 3, 4]) - 2.5
    assert stats.spearman(a, b) == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())))
    assert stats.spearman(a, -b) == pytest.approx(-stats.spearman(a, b))
    with_nan = torch.cat([a, torch.tensor([float("nan")])]), torch.cat([b, torch.tensor([7.0])])
    assert stats.spearman(*with_nan) == pytest.approx(stats.spearman(a, b))
    assert math.isnan(stats.spearman(a[:2], b[:2], min_n=3))
    assert math.isnan(stats.spearman(torch.ones(4), b))


def test_bootstrap_ci_covers_the_mean_and_is_seeded():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    lo, hi = stats.bootstrap_ci(x, n_boot=500)
    assert bool((lo < x.mean(0)).all() and (x.mean(0) < hi).all())
    lo2, _ = stats.bootstrap_ci(x, n_boot=500)
    torch.testing.assert_close(lo, lo2)
    # the ratio statistic resamples numerator and denominator together
    num, den = torch.rand(40) + 1, torch.rand(40) + 1
    rlo, rhi = stats.bootstrap_stat(lambda a, b: a.mean() / b.mean(), num, den, n_boot=300)
    assert float(rlo) < float(num.mean() / den.mean()) < float(rhi)
    with pytest.raises(ValueError, match="same number of rows"):
        stats.bootstrap_stat(lambda a, b: a.mean(), num, den[:3])


def test_multiple_testing_adjustments():
    p = [0.01, 0.04, 0.03, 0.2]
    assert stats.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.benjamini_hochberg(p) == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert stats.holm([]) == [] and stats.benjamini_hochberg([]) == []


def test_one_label_per_site(tiny_gpt2):
    from recallscope.attribution.dla import direct_logit_attribution
    from recallscope.sites import Site, site_label
    from recallscope.vocab import Component

    head = Site(Component.HEAD_OUT, 1, head=0)
    assert head.label == site_label("z", 1, head=0) == "z L1.H0"
    assert Site(Component.MLP_OUT, 1, pos=3).label == "mlp_out L1 @3"
    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid")]
    dla = direct_logit_attribution(tiny_gpt2, pairs)
    labels, _ = dla.components()
    assert head.label in labels and Site(Component.MLP_OUT, 1).label in labels and "attn_out L1 bias" in labels
    bars = dla.plot(top=len(labels)).data
    assert {"head", "MLP", "attn bias"} <= {t.name for t in bars}


def test_scale_devices_does_not_import_the_forward_pass():
    """models.forward imports scale.devices; the reverse import (even inside a function) made a cycle."""
    import ast
    from pathlib import Path

    import recallscope.scale.devices as devices

    tree = ast.parse(Path(devices.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith("recallscope.models")}, imported


def _module_level_package_imports() -> dict[str, set[str]]:
    """``package -> packages it imports at module level`` (``recallscope.results`` counts as a package)."""
    import ast
    from pathlib import Path

    import recallscope

    root = Path(recallscope.__file__).parent
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        package = "recallscope." + path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module == "recallscope":
                names = [f"recallscope.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = ".".join(name.split(".")[:2])
                if name.startswith("recallscope.") and target not in (package, "recallscope.__init__"):
                    edges.setdefault(package, set()).add(target)
    return edges


def _in_cycles(edges: dict[str, set[str]]) -> list[str]:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for n in edges.get(start, ()):
            if n == goal:
                return True
            if n not in seen:
                seen.add(n)
                if reaches(n, goal, seen):
                    return True
        return False

    return sorted(p for p in edges if reaches(p, p, set()))


def test_packages_import_each_other_without_cycles_at_module_level():
    """Module-level imports between recallscope's packages form no cycle (the layers stay ordered). Imports inside
    functions are not counted: they keep the few upward uses lazy (models -> organisms for 'organism:' specs,
    results -> plotting for figures)."""
    edges = _module_level_package_imports()
    assert edges["recallscope.patching"] >= {"recallscope.models", "recallscope.results"}  # the scan sees imports
    assert _in_cycles({**edges, "recallscope.models": edges.get("recallscope.models", set()) | {
        "recallscope.patching"}}), "the cycle check must catch a planted cycle"
    assert not _in_cycles(edges), f"packages in an import cycle at module level: {_in_cycles(edges)}"


def _all_imports(path) -> set[str]:
    """Every ``recallscope.*`` module a file imports, at module level or inside functions."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "recallscope":
            out |= {f"recallscope.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("recallscope.")}


def test_layers_organisms_below_methods_and_harness_demo_on_top():
    """The organisms package is a model source (it may use models, tasks, metrics, sites, results, but no
    method), and no library package imports the benchmark harness (``bench``), the demo or the CLI, not even
    inside a function."""
    from pathlib import Path

    import recallscope

    root = Path(recallscope.__file__).parent
    methods = {"attribution", "routes", "lens", "patching", "features", "plotting", "report"}
    top = {"bench", "demo", "cli"}
    for path in (root / "organisms").rglob("*.py"):
        bad = {m for m in _all_imports(path) if m.split(".")[1] in methods | top}
        assert not bad, f"{path.relative_to(root)} imports {sorted(bad)} (organisms sit below the methods)"
    for path in root.rglob("*.py"):
        package = path.relative_to(root).parts[0].removesuffix(".py")
        if package in top | {"__init__", "__main__", "report"}:
            continue
        bad = {m for m in _all_imports(path) if m.split(".")[1] in top}
        assert not bad, f"{path.relative_to(root)} imports {sorted(bad)} (bench/demo/cli sit on top)"
