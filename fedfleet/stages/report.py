"""Report: a run's pictures and one self-contained HTML page, from its summary.json.

`curves` draws loss, accuracy and F1 per round (each participant thin, the aggregate bold);
`page` puts the placement (with the Pareto plot, drawn by the plan stage), the VMs that
served and the failovers, the curves, the timings and the best model with how to download
it into one HTML file whose pictures are embedded (it opens anywhere, offline).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CURVES = ("loss", "accuracy", "f1")
TITLES = {"loss": "loss", "accuracy": "accuracy", "f1": "F1 (macro)"}


def curves(summary: Mapping[str, Any], path: Path) -> Path | None:
    """The per-round curves as a PNG; None when the run has no evaluated round."""
    rounds = [r for r in summary.get("rounds", []) if r.get("metrics")]
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 3.8), dpi=110)
    sites = sorted(
        {s["participant"] for r in rounds for s in r["sites"]["evaluate"] or [] if "participant" in s}
    )
    for ax, metric in zip(axes, CURVES, strict=True):
        for site in sites:
            points = [
                (r["round"], s[metric])
                for r in rounds
                for s in r["sites"]["evaluate"] or []
                if s.get("participant") == site and metric in s
            ]
            if points:
                ax.plot(
                    [p[0] for p in points], [p[1] for p in points], lw=1, alpha=0.7, marker=".", label=site
                )
        xs = [r["round"] for r in rounds if metric in r["metrics"]]
        ys = [r["metrics"][metric] for r in rounds if metric in r["metrics"]]
        ax.plot(xs, ys, lw=3, c="black", marker="o", label="all participants (weighted)")
        ax.set_title(TITLES[metric])
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"run {summary.get('run_id')} ({summary.get('stack')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _image(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return f"<p class=note>{html.escape(alt)}: not available</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_text(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}img{max-width:100%}code{background:#f4f4f4;padding:.1em .3em}
.note{color:#777}.failed{color:#b00}
"""


def page(
    summary: Mapping[str, Any], curves_png: Path | None, pareto_png: Path | None, *, pareto_note: str = ""
) -> str:
    """The whole report as one HTML document (no external resource)."""
    run_id = str(summary.get("run_id"))
    status = str(summary.get("status"))
    agg = summary.get("aggregator", {})
    planned = agg.get("planned", {})
    t = summary.get("timings", {})
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>fedfleet run {html.escape(run_id)}</title><style>{STYLE}</style></head><body>",
        f"<h1>fedfleet run {html.escape(run_id)}</h1>",
        "<p>stack <b>{}</b>, status <b class={}>{}</b>, started {}, {} of {} rounds completed{}</p>".format(
            html.escape(str(summary.get("stack"))),
            "failed" if status != "completed" else "ok",
            html.escape(status),
            html.escape(str(summary.get("started_at"))),
            summary.get("rounds_completed"),
            html.escape(str(summary.get("settings", {}).get("num-server-rounds", "?"))),
            f" &mdash; {html.escape(str(summary['error']))}" if summary.get("error") else "",
        ),
        "<h2>Placement</h2>",
        _table(
            [
                "cloud",
                "region",
                "instance type",
                "USD per hour",
                "largest RTT to a participant (ms)",
                "emulated",
            ],
            [
                [
                    planned.get("cloud"),
                    planned.get("region"),
                    planned.get("instance_type"),
                    planned.get("usd_per_hour"),
                    planned.get("max_rtt_ms"),
                    agg.get("emulated"),
                ]
            ],
        ),
        _image(pareto_png, "the placement's Pareto front"),
        f"<p class=note>{html.escape(pareto_note)}</p>" if pareto_note else "",
        "<h2>Participants and the VMs that served them</h2>",
        _table(
            ["participant", "served by", "failover order", "train examples", "test examples"],
            [
                [
                    p.get("name"),
                    p.get("vm"),
                    ", ".join(p.get("failover_order", [])) or "-",
                    p.get("train_examples"),
                    p.get("test_examples"),
                ]
                for p in summary.get("participants", [])
            ],
        ),
    ]
    orchestration = summary.get("orchestration") or {}
    failovers = orchestration.get("failovers") or []
    if failovers:
        parts.append("<h3>Failovers</h3>")
        parts.append(
            _table(
                ["participant", "lost VM", "why", "replacement", "online after (s)"],
                [
                    [
                        f.get("participant"),
                        f.get("lost_vm"),
                        str(f.get("why", "")).splitlines()[0] if f.get("why") else "",
                        f.get("replacement") or "none left",
                        f.get("replacement_seconds"),
                    ]
                    for f in failovers
                ],
            )
        )
    skipped = [
        [p, a["vm"], a["error"].splitlines()[0]]
        for p, attempts in (orchestration.get("tried") or {}).items()
        for a in attempts
        if a.get("error")
    ]
    if skipped:
        parts += ["<h3>VMs skipped at start</h3>", _table(["participant", "VM", "why"], skipped)]
    if summary.get("attempts"):
        parts += [
            "<h3>Attempts (a resumed run)</h3>",
            _table(
                ["attempt", "started", "status", "resumed after round"],
                [
                    [
                        a.get("attempt"),
                        a.get("started_at"),
                        a.get("status", "this one"),
                        a.get("resumed_after_round"),
                    ]
                    for a in summary["attempts"]
                ],
            ),
        ]
    parts += ["<h2>Rounds</h2>", _image(curves_png, "loss, accuracy and F1 per round")]
    rows = [
        [
            r["round"],
            *(r["metrics"].get(m) for m in ("loss", "accuracy", "f1", "precision", "recall")),
            r.get("seconds"),
        ]
        for r in summary.get("rounds", [])
    ]
    parts.append(_table(["round", "loss", "accuracy", "F1", "precision", "recall", "seconds"], rows))
    parts += [
        "<h2>Timings</h2>",
        _table(
            ["stage", "seconds"], [[k.removesuffix("_seconds").replace("_", " "), v] for k, v in t.items()]
        ),
    ]
    best = summary.get("best_round")
    parts.append("<h2>Best model</h2>")
    if best:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in best["metrics"].items())
        parts.append(
            f"<p>round <b>{best['round']}</b> by {html.escape(best['by'])}: {html.escape(metrics)}; "
            f"its weights: <code>runs/{html.escape(run_id)}/{html.escape(str(best['model']))}</code></p>"
        )
        if (summary.get("registry") or {}).get("mlflow_run_id"):
            parts.append(
                f"<p>download it (an MLflow model, a plain state_dict and its source): "
                f"<code>fedfleet models download {html.escape(run_id)}:{best['round']} -o DIR</code></p>"
            )
    else:
        parts.append("<p class=note>no round was evaluated</p>")
    registry = summary.get("registry") or {}
    if registry.get("mlflow_run_id"):
        parts.append(
            f"<p>recorded in MLflow at <code>{html.escape(str(registry.get('tracking_uri')))}</code>, run "
            f"<code>{html.escape(str(registry['mlflow_run_id']))}</code> (<code>fedfleet ui</code>)</p>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)
