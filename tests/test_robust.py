"""Updates that cannot poison the model: every train reply screened before aggregation, robust
strategies, and Flower's differential-privacy wrappers with their noise and clipping recorded."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fedfleet_app import compute
from fedfleet_app.client_app import _client_side_clipping
from fedfleet_app.data import write_demo
from fedfleet_app.settings import SITE_RECORD, WEIGHTS, AppSettings, SettingsError
from fedfleet_app.strategy import RecordedStrategy, RoundFailed, build_strategy, screen
from fedfleet_app.task import build_model, to_vector
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedfleet.core.records import RunState


@pytest.fixture(autouse=True)
def serverapp_identity() -> None:
    """What Flower sets in a ServerApp process before any message is made."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def reply(weights: np.ndarray, site: int, examples: float = 100) -> Any:
    """A site's train reply as the ServerApp receives it."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({WEIGHTS: Array(weights)}),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5}),
            SITE_RECORD: ConfigRecord({"participant": f"hospital-{site}", "vm": f"vm-{site}"}),
        }
    )
    return SimpleNamespace(
        content=content, has_error=lambda: False, metadata=SimpleNamespace(src_node_id=site)
    )


class Grid:
    """What the strategies ask of Flower's grid when they configure a round."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _round(strategy: RecordedStrategy, number: int, weights: np.ndarray, replies: list[Any]) -> np.ndarray:
    strategy.configure_train(
        number, ArrayRecord({WEIGHTS: Array(weights)}), ConfigRecord(), Grid(len(replies))
    )
    aggregated, _ = strategy.aggregate_train(number, replies)
    assert aggregated is not None
    return aggregated[WEIGHTS].numpy()


def test_malformed_poisoned_and_outsized_updates_are_rejected_with_their_reason():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=50).astype(np.float32)
    honest = [reply(ref + 0.01 * rng.normal(size=50).astype(np.float32), site) for site in range(1, 4)]
    nan = ref.copy()
    nan[3] = np.nan
    inf = ref.copy()
    inf[0] = np.inf
    bad = [
        reply(nan, 4),
        reply(inf, 5),
        reply(ref[:49], 6),
        reply(ref.astype(np.float64), 7),
        reply(ref + 100 * (honest[0].content["arrays"][WEIGHTS].numpy() - ref), 8),  # scaled x100
        reply(ref, 9, examples=float("inf")),
        reply(ref, 10, examples=0),
    ]
    kept, rejected = screen(honest + bad, {WEIGHTS: ref}, max_norm=0, max_ratio=10)
    assert [m.metadata.src_node_id for m in kept] == [1, 2, 3]
    reasons = {r["participant"]: r["reason"] for r in rejected}
    assert (
        reasons["hospital-4"] == "NaN or Inf in weights" and reasons["hospital-5"] == "NaN or Inf in weights"
    )
    assert reasons["hospital-6"] == "weights: float32[49] instead of float32[50]"
    assert reasons["hospital-7"] == "weights: float64[50] instead of float32[50]"
    assert (
        reasons["hospital-8"].startswith("update norm ")
        and "x the median of the others" in reasons["hospital-8"]
    )
    assert "num-examples inf is not a positive number" in reasons["hospital-9"]
    assert "num-examples 0 is not a positive number" in reasons["hospital-10"]
    assert all(r["vm"] and r["node"] for r in rejected)
    # The absolute bound, and both bounds off.
    _, rejected = screen(honest, {WEIGHTS: ref}, max_norm=1e-6, max_ratio=0)
    assert len(rejected) == 3 and "above max-update-norm 1e-06" in rejected[0]["reason"]
    kept, rejected = screen([*honest, bad[4]], {WEIGHTS: ref}, max_norm=0, max_ratio=0)
    assert len(kept) == 4 and rejected == []
    # With two sites neither can tell which one is odd (a tiny update would make the honest one
    # look huge): the ratio needs three; the absolute bound still applies.
    kept, rejected = screen([honest[0], bad[4]], {WEIGHTS: ref}, max_norm=0, max_ratio=10)
    assert len(kept) == 2 and rejected == []
    # Replies Flower's aggregation would choke on are rejected too.
    extra = reply(ref, 11)
    extra.content["more"] = MetricRecord({"num-examples": 1.0})
    renamed = reply(ref, 12)
    renamed.content["weights-elsewhere"] = renamed.content.array_records["arrays"]
    del renamed.content["arrays"]
    odd_keys = reply(ref, 13)
    odd_keys.content["metrics"] = MetricRecord({"num-examples": 100.0})
    kept, rejected = screen([*honest, extra, renamed, odd_keys], {WEIGHTS: ref}, max_norm=0, max_ratio=10)
    assert len(kept) == 3
    reasons = {r["participant"]: r["reason"] for r in rejected}
    assert reasons == {
        "hospital-11": "2 metric records instead of one",
        "hospital-12": "array records ['weights-elsewhere'] instead of ['arrays']",
        "hospital-13": "metrics ['num-examples'] instead of ['num-examples', 'train-loss']",
    }


def test_a_round_completes_with_the_rest_and_records_who_was_rejected_and_when():
    events: list[dict[str, Any]] = []
    settings = AppSettings(min_participants=2)
    strategy = RecordedStrategy(
        build_strategy(settings), settings, lambda e, **f: events.append({"event": e, **f})
    )
    ref = np.zeros(4, dtype=np.float32)
    nan = np.full(4, np.nan, dtype=np.float32)
    out = _round(strategy, 1, ref, [reply(ref + 1, 1), reply(ref + 3, 2), reply(nan, 3)])
    assert np.allclose(out, 2.0)  # the two honest sites, equally weighted
    rejected = [e for e in events if e["event"] == "rejected"]
    assert rejected == [
        {"event": "rejected", "round": 1, "updates": [
            {"node": 3, "participant": "hospital-3", "vm": "vm-3", "reason": "NaN or Inf in weights"}
        ]},
    ]  # fmt: skip
    state = RunState(3)
    for e in events:
        state.apply(e)
    assert state.rounds[1].to_dict()["rejected"][0]["participant"] == "hospital-3"
    # Too few left: the round fails, naming who was rejected and why.
    with pytest.raises(
        RoundFailed, match=r"1 updates accepted, fewer than min-participants=2; hospital-3: NaN"
    ):
        _round(strategy, 2, ref, [reply(ref + 1, 1), reply(nan, 3)])


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_strategies_keep_an_outlier_from_moving_the_model(name: str):
    options = {"num_malicious_nodes": 1} if "krum" in name or name == "bulyan" else {}  # Bulyan: n >= 4f + 3
    settings = AppSettings(
        strategy=name, strategy_options=options, min_participants=7, max_update_norm_ratio=0
    )
    strategy = RecordedStrategy(build_strategy(settings), settings, lambda *a, **k: None)
    ref = np.zeros(6, dtype=np.float32)
    honest = [reply(ref + 1 + 0.01 * i, i + 1) for i in range(6)]
    out = _round(strategy, 1, ref, [*honest, reply(ref + 1000, 7)])
    assert np.all(np.abs(out - 1) < 0.1), f"{name}: {out}"


def test_fedadam_keeps_the_models_dtype_and_a_strategy_that_aggregates_nothing_fails_the_round():
    settings = AppSettings(strategy="fedadam", strategy_options={"eta": 0.05}, min_participants=3)
    strategy = RecordedStrategy(build_strategy(settings), settings, lambda *a, **k: None)
    weights = np.zeros(8, dtype=np.float32)
    for number in (1, 2, 3):  # FedAdam computes in float64; the sites reply in float32
        weights = _round(strategy, number, weights, [reply(weights + i, i) for i in (1, 2, 3)])
        assert weights.dtype == np.float32
    with pytest.raises(
        SettingsError, match="min-participants must be at least 7 for bulyan with num_malicious_nodes=1"
    ):
        AppSettings(strategy="bulyan", strategy_options={"num_malicious_nodes": 1}, min_participants=3)
    settings = AppSettings(strategy="bulyan", min_participants=3)
    strategy = RecordedStrategy(build_strategy(settings), settings, lambda *a, **k: None)
    strategy.inner.aggregate_train = lambda *a: (None, None)  # what Flower's Bulyan returns when short
    with pytest.raises(RoundFailed, match="bulyan aggregated nothing from 3 accepted updates"):
        _round(strategy, 1, weights, [reply(weights + i, i) for i in (1, 2, 3)])


def test_differential_privacy_noise_and_clipping_are_applied_and_recorded_per_round():
    events: list[dict[str, Any]] = []
    ref = np.zeros(1000, dtype=np.float32)
    replies = [reply(ref + 1.0, i) for i in range(1, 5)]  # each update's norm: sqrt(1000) ~ 31.6
    # Clipping alone: the aggregate moves by at most the clipping norm.
    settings = AppSettings(
        dp="server-fixed", dp_noise_multiplier=0.0, dp_clipping_norm=2.0, min_participants=4
    )
    strategy = RecordedStrategy(
        build_strategy(settings), settings, lambda e, **f: events.append({"event": e, **f})
    )
    out = _round(strategy, 1, ref, replies)
    assert np.linalg.norm(out - ref) == pytest.approx(2.0, rel=1e-5)
    # Noise: its standard deviation is noise-multiplier x clipping norm / participants.
    settings = AppSettings(
        dp="server-fixed", dp_noise_multiplier=0.5, dp_clipping_norm=2.0, min_participants=4
    )
    strategy = RecordedStrategy(
        build_strategy(settings), settings, lambda e, **f: events.append({"event": e, **f})
    )
    out = _round(strategy, 1, ref, replies)
    clipped_mean = 2.0 / np.sqrt(1000)
    assert np.std(out - clipped_mean) == pytest.approx(0.5 * 2.0 / 4, rel=0.1)
    privacy = [e for e in events if e["event"] == "privacy"]
    assert privacy[1] == {
        "event": "privacy", "round": 1, "mode": "server-fixed", "noise_multiplier": 0.5, "clipping_norm": 2.0,
        "noise_stddev": 0.25, "next_clipping_norm": 2.0,
    }  # fmt: skip
    # Adaptive: the clipping norm moves each round with the share of updates it clipped.
    settings = AppSettings(
        dp="server-adaptive", dp_noise_multiplier=0.0, dp_clipping_norm=1.0, min_participants=4
    )
    strategy = RecordedStrategy(
        build_strategy(settings), settings, lambda e, **f: events.append({"event": e, **f})
    )
    _round(strategy, 1, ref, replies)
    last = [e for e in events if e["event"] == "privacy"][-1]
    assert last["mode"] == "server-adaptive" and last["clipping_norm"] == 1.0
    assert last["next_clipping_norm"] != 1.0  # adapted to the updates' norms
    # With noise, what is recorded is what Flower added: its effective multiplier (raised to pay
    # for the noised count of clipped updates) on the adapted norm.
    settings = AppSettings(
        dp="server-adaptive", dp_noise_multiplier=1.0, dp_clipping_norm=1.0, min_participants=4
    )
    strategy = RecordedStrategy(
        build_strategy(settings), settings, lambda e, **f: events.append({"event": e, **f})
    )
    out = _round(strategy, 1, ref, replies)
    last = [e for e in events if e["event"] == "privacy"][-1]
    assert last["noise_multiplier"] > 1.0
    assert np.std(out - np.mean(out)) == pytest.approx(last["noise_stddev"], rel=0.1)
    state = RunState(3)
    for e in events:
        state.apply(e)
    assert state.rounds[1].to_dict()["privacy"]["mode"] == "server-adaptive"


def test_client_side_clipping_clips_each_update_before_it_leaves_the_site():
    settings = AppSettings(dp="client-fixed", dp_clipping_norm=1.5, min_participants=1)
    strategy = build_strategy(settings)
    ref = np.zeros(100, dtype=np.float32)
    (message,) = list(
        strategy.configure_train(1, ArrayRecord({WEIGHTS: Array(ref)}), ConfigRecord(), Grid(1))
    )

    def train(msg: Message, context: Any) -> Message:  # what the site's training returns
        content = RecordDict(
            {
                "arrays": ArrayRecord({WEIGHTS: Array(ref + 3.0)}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    context = SimpleNamespace(run_config=settings.to_run_config())
    out = _client_side_clipping(message, context, train)  # type: ignore[arg-type]
    assert np.linalg.norm(out.content["arrays"][WEIGHTS].numpy() - ref) == pytest.approx(1.5, rel=1e-5)
    context = SimpleNamespace(run_config=AppSettings().to_run_config())  # no DP: untouched
    out = _client_side_clipping(message, context, train)  # type: ignore[arg-type]
    assert np.allclose(out.content["arrays"][WEIGHTS].numpy(), 3.0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dp", "local", "dp must be one of '', 'server-fixed'"),
        ("dp_noise_multiplier", -1.0, "dp-noise-multiplier must be in 0..100"),
        ("dp_clipping_norm", 0.0, "dp-clipping-norm must be in (0, 1e6]"),
        ("dp_target_quantile", 1.0, "dp-target-quantile must be in (0, 1)"),
        (
            "max_update_norm",
            float("nan"),
            "max-update-norm must be 0 (no absolute bound) or a positive number",
        ),
        ("max_update_norm_ratio", 0.5, "max-update-norm-ratio must be 0 (off) or a number above 1"),
    ],
)
def test_out_of_range_settings_name_the_key(key: str, value: Any, message: str):
    with pytest.raises(SettingsError) as err:
        AppSettings(**{key: value})
    assert message in str(err.value)


def test_a_poisoned_participant_is_rejected_while_accuracy_still_improves(tmp_path: Path):
    """Real training on three sites' data; the third sends its update scaled x50, then NaN."""
    sites = [tmp_path / f"site-{i}" for i in range(3)]
    write_demo(sites, iid=True, alpha=1.0, seed=0, test_fraction=0.2)
    settings = AppSettings(local_epochs=1, min_participants=2)
    start = to_vector(build_model(settings.channels, settings.num_classes, settings.model_seed, image_size=8))

    def accuracy(weights: np.ndarray) -> float:
        scores = [compute.run_evaluate(str(s), settings, weights)["metrics"] for s in sites[:2]]
        return float(np.mean([s["accuracy"] for s in scores]))

    def run(screening: bool) -> tuple[float, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        tuned = AppSettings(
            local_epochs=1, min_participants=2, max_update_norm_ratio=10.0 if screening else 0.0
        )
        strategy = RecordedStrategy(
            build_strategy(tuned), tuned, lambda e, **f: events.append({"event": e, **f})
        )
        weights = start
        for number in (1, 2):
            trained = [
                compute.run_train(
                    str(s), tuned, weights, evaluate_received=False, proximal_mu=0.0, server_round=number
                )
                for s in sites
            ]
            updates = [t["weights"] for t in trained]
            updates[2] = (
                (weights + 50 * (updates[2] - weights)) if number == 1 else np.full_like(weights, np.nan)
            )
            replies = [
                reply(u.astype(np.float32), i + 1, t["metrics"]["num-examples"])
                for i, (u, t) in enumerate(zip(updates, trained, strict=True))
            ]
            if not screening and number == 2:
                break  # a NaN would only poison what the scaled update already ruined
            weights = _round(strategy, number, weights, replies)
        return accuracy(weights), [e for e in events if e["event"] == "rejected"]

    before = accuracy(start)
    screened, rejected = run(screening=True)
    unscreened, _ = run(screening=False)
    assert [(e["round"], e["updates"][0]["participant"]) for e in rejected] == [
        (1, "hospital-3"),
        (2, "hospital-3"),
    ]
    assert "x the median of the others" in rejected[0]["updates"][0]["reason"]
    assert rejected[1]["updates"][0]["reason"] == "NaN or Inf in weights"
    assert screened > before + 0.2, (before, screened)
    assert unscreened < screened - 0.2, (unscreened, screened)  # what the screening prevented


def test_a_resumed_run_gets_back_the_privacy_wrappers_and_the_wrapped_strategys_state():
    from fedfleet_app.strategy import restore_state, strategy_state

    settings = AppSettings(strategy="fedadam", strategy_options={"eta": 0.05}, dp="server-adaptive",
                           dp_noise_multiplier=0.0, dp_clipping_norm=1.0, min_participants=3)  # fmt: skip
    first = RecordedStrategy(build_strategy(settings), settings, lambda *a, **k: None)
    ref = np.zeros(8, dtype=np.float32)
    _round(first, 1, ref, [reply(ref + i, i) for i in (1, 2, 3)])
    state = strategy_state(first.inner)
    assert "clipping_norm/=" in state and any(k.startswith("strategy.m_t/") for k in state)
    second = RecordedStrategy(build_strategy(settings), settings, lambda *a, **k: None)
    restored = restore_state(second.inner, state)
    assert "clipping_norm" in restored and "strategy.m_t" in restored and "strategy.v_t" in restored
    assert second.inner.clipping_norm == first.inner.clipping_norm != 1.0
    assert all(np.array_equal(second.inner.strategy.m_t[k], v) for k, v in first.inner.strategy.m_t.items())
