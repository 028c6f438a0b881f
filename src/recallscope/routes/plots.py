"""Figures of the route module: the route diagram of a :class:`~recallscope.routes.report.RouteReport`."""

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from recallscope.plotting import apply_style

SCORE_LABELS = {"causal": "interchange (causal)", "attribution": "attribution", "similarity": "similarity",
                "readout": "lens readout", "string": "string (not the model)"}
"""Axis labels of the human-comparison score types (:data:`recallscope.routes.human.SCORES`)."""

VERDICT_COLORS = {"route": "rgba(214, 39, 40, 0.75)", "inconclusive": "rgba(255, 127, 14, 0.55)",
                  "no route": "rgba(150, 150, 150, 0.45)", "competitor": "rgba(31, 119, 180, 0.45)"}
"""Link colours of the route diagram by verdict (competitors in blue)."""


def plot_route_report(report: Any, *, top: int = 8, title: str | None = None) -> go.Figure:
    """Sankey input -> concept -> output for the candidates *and* the competitors (widths = mediated
    share, colour = verdict; competitors blue) above the per-layer interchange effect (share of the total
    effect) of each candidate beside each competitor class (dashed: the class's strongest member) and the
    range of the matched random directions (shaded)."""
    rows = report.routes()[:top]
    comp = sorted(report.competitor_rows(), key=lambda r: -r.mediation)[:top]
    q = report.query
    fig = make_subplots(rows=2, cols=1, row_heights=[0.55, 0.45], vertical_spacing=0.1,
                        specs=[[{"type": "sankey"}], [{"type": "xy"}]])
    shown = rows + comp
    labels = [f"input {q['input'].strip()!r}"] + [
        f"{r.name} [{r.verdict}] score {r.score:+.2f}, p_holm {r.p_holm:.3g}" if r.role == "candidate"
        else f"{r.name} [competitor] mediated {r.mediation:+.2f}" for r in shown] + [f"output {q['output'].strip()!r}"]
    out = len(shown) + 1
    widths = [max(r.mediation, 0.0) + 0.02 if r.mediation == r.mediation else 0.02 for r in shown]
    colors = [VERDICT_COLORS[r.verdict] for r in shown]
    fig.add_trace(go.Sankey(
        arrangement="snap", node=dict(label=labels, pad=14, thickness=14, color="#d0d7e2"),
        link=dict(source=[0] * len(shown) + list(range(1, out)), target=list(range(1, out)) + [out] * len(shown),
                  value=widths * 2, color=colors * 2)), row=1, col=1)
    x = list(report.windows)
    scale = report.scale()
    mean = report.interchange.nanmean(0) / scale  # [slot, window]
    rand = [j for j, c in enumerate(report.classes) if c == "random"]
    if rand:
        fig.add_trace(go.Scatter(x=x, y=mean[rand].amax(0).tolist(), mode="lines", line=dict(width=0),
                                 showlegend=False, hoverinfo="skip"), row=2, col=1)
        fig.add_trace(go.Scatter(x=x, y=mean[rand].amin(0).tolist(), mode="lines", line=dict(width=0),
                                 fill="tonexty", fillcolor="rgba(150,150,150,0.18)", name="matched random (range)",
                                 hoverinfo="skip"), row=2, col=1)
    shared = sorted({c for c, r in zip(report.classes, report.roles) if r in ("auto", "competitor")})
    for cls in shared:
        members = [j for j, c in enumerate(report.classes) if c == cls]
        fig.add_trace(go.Scatter(x=x, y=mean[members].amax(0).tolist(), mode="lines", line=dict(dash="dash"),
                                 name=f"competitor: {cls} (strongest)",
                                 hovertemplate="layer %{x}: %{y:.3f}<extra>" + cls + "</extra>"), row=2, col=1)
    index = {n: i for i, n in enumerate(report.names)}
    for r in rows:
        fig.add_trace(go.Scatter(x=x, y=mean[index[r.name]].tolist(), mode="lines+markers", name=r.name,
                                 hovertemplate="layer %{x}: %{y:.3f}<extra>" + r.name + "</extra>"), row=2, col=1)
    fig.update_xaxes(title_text="layer (intervention window start)", row=2, col=1)
    fig.update_yaxes(title_text="interchange effect / total effect", row=2, col=1)
    te = report.total_effect.nanmean().item()
    apply_style(fig, title=title or f"routes {q['name']}: total effect {te:.2f} nats, verdict {report.verdict()}")
    fig.update_layout(height=820, legend=dict(orientation="h", y=-0.12))
    return fig


def plot_human_comparison(result: Any, *, title: str | None = None) -> go.Figure:
    """Left: mean percentile of the human keyword among its controls per score and link type (95% CI,
    dashed 0.5 = chance). Right: top-1 hit rate against its chance level."""
    from recallscope.routes.human import SCORES

    # "causal" is the interchange score (the route's necessity by swapping the concept's component for
    # another concept's); the axis says which causal test it is.
    labels = [SCORE_LABELS.get(s, s) for s in SCORES]

    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.12,
                        subplot_titles=("human keyword's percentile among controls (0.5 = chance)",
                                        "top-1 hit rate (dotted = chance)"))
    groups = {"all": None, "sound/orthographic": "sound/orthographic", "meaning/etymology": "meaning/etymology"}
    colors = {"all": "#444444", "sound/orthographic": "#d62728", "meaning/etymology": "#1f77b4"}
    for name, link in groups.items():
        stats = [result.agreement(s, link) for s in SCORES]
        ok = [st.get("n_cards", 0) > 0 for st in stats]
        mean = [st["mean_percentile"] if k else None for st, k in zip(stats, ok)]
        lo = [st["mean_percentile"] - st["mean_percentile_ci95"][0] if k else None for st, k in zip(stats, ok)]
        hi = [st["mean_percentile_ci95"][1] - st["mean_percentile"] if k else None for st, k in zip(stats, ok)]
        n = stats[0].get("n_cards", 0)
        p = [f"{st['p_value']:.3g}" if k else "" for st, k in zip(stats, ok)]
        fig.add_trace(go.Bar(x=labels, y=mean, name=f"{name} (n={n})", marker_color=colors[name],
                             error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo), customdata=p,
                             hovertemplate="%{x}: %{y:.3f}, permutation p = %{customdata}<extra>" + name + "</extra>",
                             legendgroup=name), row=1, col=1)
        fig.add_trace(go.Bar(x=labels, y=[st.get("top1") if k else None for st, k in zip(stats, ok)],
                             name=name, marker_color=colors[name], showlegend=False, legendgroup=name), row=1, col=2)
    fig.add_hline(y=0.5, line=dict(dash="dash", color="#888888"), row=1, col=1)
    chance = result.agreement("causal").get("top1_chance", 0.1)
    fig.add_hline(y=chance, line=dict(dash="dot", color="#888888"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    apply_style(fig, title=title or f"model routes vs human mnemonic keywords ({len(result.rows)} cards; "
                                    "'string' = text similarity, not the model)")
    fig.update_layout(barmode="group", height=520, legend=dict(orientation="h", y=-0.18))
    return fig
