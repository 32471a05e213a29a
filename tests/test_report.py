"""`fedfleet models report`: a run's curves and one self-contained HTML page, from its summary.json."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from fedfleet.stages import report

from .test_cli_errors import fedfleet

PNG = b"\x89PNG\r\n\x1a\n"


def summary(run_id: str, rounds: int = 3) -> dict[str, Any]:
    sites = ("hospital-us", "hospital-eu")

    def site(name: str, n: int, i: int) -> dict[str, Any]:
        return {"participant": name, "vm": f"{name[9:]}-vm-1", "loss": 2 - n / 2 - i / 10,
                "accuracy": 0.2 * n + i / 20, "f1": 0.18 * n, "num-examples": 50}  # fmt: skip

    return {
        "run_id": run_id,
        "stack": "local",
        "status": "completed",
        "started_at": "2026-12-05T11:00:00+00:00",
        "settings": {"num-server-rounds": rounds},
        "aggregator": {
            "emulated": True,
            "planned": {
                "cloud": "aws",
                "region": "us-west-2",
                "instance_type": "t3.medium",
                "usd_per_hour": 0.0416,
                "max_rtt_ms": 159.3,
            },
        },
        "participants": [
            {
                "name": s,
                "vm": f"{s[9:]}-vm-2",
                "failover_order": [f"{s[9:]}-vm-1"],
                "train_examples": 200,
                "test_examples": 50,
            }
            for s in sites
        ],
        "orchestration": {
            "failovers": [
                {
                    "participant": "hospital-eu",
                    "lost_vm": "eu-vm-1",
                    "why": "<script>alert(1)</script> died",
                    "replacement": "eu-vm-2",
                    "replacement_seconds": 7.5,
                }
            ],
            "tried": {"hospital-us": [{"vm": "us-vm-1", "error": "port 9101 on us-vm-1 is already in use"}]},
        },
        "rounds_completed": rounds,
        "rounds": [
            {
                "round": n,
                "metrics": {"loss": 2 - n / 2, "accuracy": 0.2 * n, "f1": 0.18 * n},
                "seconds": 5.0 if n else None,
                "sites": {"train": [], "evaluate": [site(s, n, i) for i, s in enumerate(sites)]},
            }
            for n in range(rounds + 1)
        ],
        "best_round": {
            "round": rounds,
            "by": "accuracy",
            "metrics": {"accuracy": 0.2 * rounds},
            "model": f"models/round-{rounds}.pt",
        },
        "timings": {"total_seconds": 50.0, "training_seconds": 20.0},
        "registry": {"tracking_uri": "sqlite:////x/mlflow.db", "mlflow_run_id": "abc123"},
    }


def test_a_runs_report_is_one_self_contained_page_with_its_pictures(make_project) -> None:
    project = make_project()
    run_dir = project / "runs" / "20261205-110000-abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary(run_dir.name)))
    out = fedfleet(project, "models", "report", "20261205-11", "--json")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["report"] == str(run_dir / "report" / "report.html")
    page = Path(made["report"]).read_text()
    for text in ("fedfleet run 20261205-110000-abcd", "t3.medium", "us-west-2", "us-vm-2", "eu-vm-1", "eu-vm-2",
                 "port 9101 on us-vm-1 is already in use", "fedfleet models download 20261205-110000-abcd:3 -o DIR",
                 "abc123"):  # fmt: skip
        assert text in page, text
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; died" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG) for i in images)  # curves, Pareto
    curves = Path(made["curves"]).read_bytes()
    assert curves.startswith(PNG) and int.from_bytes(curves[16:20], "big") == 1320  # 12 in at 110 dpi
    # Unknown runs are named, with the closest.
    missing = fedfleet(project, "models", "report", "20261205-110000-abce")
    assert missing.returncode == 2 and "did you mean '20261205-110000-abcd'?" in missing.stderr


def test_a_run_without_scores_gets_a_page_that_says_so(tmp_path: Path) -> None:
    empty = summary("r", 0) | {"rounds": [], "best_round": None, "status": "failed", "error": "x <y>"}
    assert report.curves(empty, tmp_path / "c.png") is None
    page = report.page(empty, None, None, pareto_note="the Pareto plot could not be drawn: no stack")
    assert "loss, accuracy and F1 per round: not available" in page and "no round was evaluated" in page
    assert "x &lt;y&gt;" in page and "could not be drawn: no stack" in page
