"""Catalog, network model, placement problem and NSGA-II (fedfleet/catalog, fedfleet/placement)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from fedfleet.core.catalog import load_catalog
from fedfleet.core.errors import ConfigError
from fedfleet.core.placement.network import EgressPricer, RttModel, Site, great_circle_km, round_time
from fedfleet.core.placement.optimizer import Infeasible, choose, nsga2, pareto_indices, plan, verify
from fedfleet.core.placement.problem import Currency, Placement, Requirements


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def site(catalog, cloud: str, region: str) -> Site:
    r = catalog.regions[(cloud, region)]
    return Site(f"{cloud}:{region}", cloud, region, r.lat, r.lon, r.country)


@pytest.fixture(scope="module")
def seed_sites(catalog):
    return [
        site(catalog, "aws", "us-east-1"),
        site(catalog, "gcp", "asia-northeast3"),
        site(catalog, "azure", "westeurope"),
    ]


# -- catalog -----------------------------------------------------------------------------


def test_shipped_catalog_keeps_a_source_for_every_number(catalog):
    assert len(catalog.regions) == 133 and len(catalog.prices) == 1457 and len(catalog.egress) == 1089
    for table in (catalog.regions, catalog.prices, catalog.egress):
        assert all(entry.source for entry in table.values())
    assert all(r.source for rows in catalog.rtts.values() for r in rows)


def test_override_adds_and_replaces_with_its_own_source(tmp_path: Path):
    f = tmp_path / "mine.csv"
    f.write_text(
        "cloud,region,instance_type,vcpu,memory_gib,usd_per_hour\n"
        "aws,us-east-1,t3.medium,2,4,0.01\n"
        "aws,us-east-1,my.special,4,16,0.02\n"
    )
    rtt = tmp_path / "rtt.csv"
    rtt.write_text(
        "cloud_a,region_a,cloud_b,region_b,rtt_ms,source\naws,us-east-1,gcp,asia-northeast3,123,my ping\n"
    )
    catalog = load_catalog([f, rtt])
    assert catalog.prices[("aws", "us-east-1", "t3.medium")].usd_per_hour == 0.01
    assert catalog.prices[("aws", "us-east-1", "my.special")].source == f"{f} row 3"
    measured = catalog.measured_rtt(("gcp", "asia-northeast3"), ("aws", "us-east-1"))
    assert measured is not None and (measured.rtt_ms, measured.source) == (123.0, "my ping")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            "cloud,region,instance_type,vcpu,memory_gib,usd_per_hour\naws,us-east-1,x,two,4,0.1\n",
            r"row 2, column vcpu: 'two' is not a number",
        ),
        (
            "cloud,region,instance_type,vcpu,memory_gib,usd_per_hour\naws,us-east-1,x,2,4,0.1\nibm,x,y,2,4,1\n",
            r"row 3, column cloud: 'ibm' is not one of aws, gcp, azure",
        ),
        (
            "cloud_a,region_a,cloud_b,region_b,rtt_ms\naws,us-east-1,aws,us-west-2,-5\n",
            r"row 2, column rtt_ms: -5 is outside",
        ),
        ("name,price\nx,1\n", r"the header \(name, price\) matches no catalog table"),
    ],
)
def test_malformed_override_names_file_and_row(tmp_path: Path, content: str, match: str):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_catalog([f])
    assert str(f) in str(info.value)


# -- network -----------------------------------------------------------------------------


def test_great_circle_distance_of_known_cities():
    assert great_circle_km(51.5074, -0.1278, 48.8566, 2.3522) == pytest.approx(344, abs=3)  # London-Paris
    assert great_circle_km(40.7128, -74.0060, 35.6762, 139.6503) == pytest.approx(
        10850, rel=0.01
    )  # NYC-Tokyo


def test_rtt_estimator_is_fitted_and_its_error_reported(catalog):
    fit = RttModel(catalog).fit
    assert fit.fitted_pairs > 1000 and fit.holdout_pairs > 200
    # Light in fibre needs ~0.01 ms per km of distance for a round trip; routes are longer.
    assert 0.01 < fit.slope_ms_per_km < 0.03
    assert fit.holdout_median_abs_pct < 35


def test_measured_rtt_wins_and_private_sites_are_estimated(catalog, seed_sites):
    model = RttModel(catalog)
    us, kr, _ = seed_sites
    measured = model.rtt(us, kr)
    assert not measured.estimated and "skyplane" in measured.source
    dc = Site("seoul-dc", None, None, 37.56, 126.97)
    estimate = model.rtt(dc, us)
    assert estimate.estimated and "great-circle" in estimate.source
    assert estimate.value == pytest.approx(model.fit.predict(great_circle_km(37.56, 126.97, us.lat, us.lon)))


def test_egress_rules_follow_the_catalog_rows(catalog, seed_sites):
    pricer = EgressPricer(catalog)
    us, kr, eu = seed_sites
    us2 = site(catalog, "aws", "eu-west-1")
    cases = [
        (us, us2, ("aws", "aws:us-east-1", "aws:eu-west-1")),
        (us, kr, ("aws", "aws:us-east-1", "internet")),
        (kr, us, ("gcp", "gcp asia-northeast3 (premium)", "aws/azure/other cloud (non-Australia)")),
        (
            kr,
            site(catalog, "gcp", "europe-west1"),
            ("gcp", "gcp region (other inter-continent)", "gcp region"),
        ),
        (eu, us, ("azure", "azure North America / Europe", "internet or other cloud")),
        (
            eu,
            site(catalog, "azure", "koreacentral"),
            ("azure", "azure North America / Europe", "azure region, other continent"),
        ),
    ]
    for src, dst, key in cases:
        quote = pricer.price(src, dst, monthly_gb=10)
        assert quote is not None
        assert (quote.value, quote.source) == (catalog.egress[key].usd_per_gb, catalog.egress[key].source), (
            key
        )
    private = Site("dc", None, None, 10, 10)
    assert pricer.price(private, us, 10).value == 0.0
    assert (
        pricer.price(kr, private, 10).source
        == catalog.egress[
            (
                "gcp",
                "gcp:asia-northeast3",
                "internet (worldwide excl. China & Australia, premium tier) [0-1 TB/month]",
            )
        ].source
    )


def test_round_time_grows_with_rtt_and_model_size():
    rtt = np.array([[20.0, 50.0], [20.0, 200.0]])
    small, large = round_time(rtt, 1e6, 2), round_time(rtt, 100e6, 2)
    assert small[1] > small[0] and np.all(large > small)


# -- problem and optimizer --------------------------------------------------------------


def test_pareto_indices_match_brute_force():
    rng = np.random.default_rng(0)
    cost, lat = rng.integers(0, 30, 300).astype(float), rng.integers(0, 30, 300).astype(float)
    mask = rng.random(300) < 0.8
    front = pareto_indices(cost, lat, mask)
    brute = {
        (cost[i], lat[i])
        for i in np.flatnonzero(mask)
        if not any(
            cost[j] <= cost[i] and lat[j] <= lat[i] and (cost[j], lat[j]) != (cost[i], lat[i])
            for j in np.flatnonzero(mask)
        )
    }
    assert {(cost[i], lat[i]) for i in front} == brute


def test_filters_apply_and_unknown_names_get_suggestions(catalog, seed_sites):
    p = Placement(catalog, seed_sites, Requirements(min_vcpu=4, min_memory_gib=16, clouds=("aws", "gcp")))
    assert p.candidates and all(
        c.vcpu >= 4 and c.memory_gib >= 16 and c.cloud != "azure" for c in p.candidates
    )
    with pytest.raises(
        ConfigError, match=r"'aws:us-east-9' is not a region in the catalog \(closest: aws:us-east-"
    ):
        Placement(catalog, seed_sites, Requirements(regions=("aws:us-east-9",)))
    with pytest.raises(
        ConfigError, match=r"no instance type t3.mediun on aws in the catalog \(closest: t3.medium"
    ):
        Placement(catalog, seed_sites, Requirements(exclude=("aws:us-east-1:t3.mediun",)))
    p = Placement(catalog, seed_sites, Requirements(exclude=("azure", "aws:us-*")))
    assert not any(
        c.cloud == "azure" or (c.region.startswith("us-") and c.cloud == "aws") for c in p.candidates
    )


@pytest.mark.parametrize("participants", [3, 10])
def test_nsga2_finds_the_exact_front(catalog, participants: int):
    rng = np.random.default_rng(participants)
    keys = sorted(catalog.regions)
    sites = [site(catalog, *keys[i]) for i in rng.choice(len(keys), participants, replace=False)]
    placement = Placement(catalog, sites, Requirements())
    front, evaluations = nsga2(placement, seed=1)
    check = verify(placement, front)
    assert check.share_found >= 0.99 and check.hypervolume_ratio >= 0.99
    assert evaluations < len(placement.candidates) * 3


def test_weights_pick_the_ends_of_the_front(catalog, seed_sites):
    base = Requirements(max_latency_ms=250)
    p = Placement(catalog, seed_sites, base)
    front = pareto_indices(p.cost, p.max_rtt, p.feasible)
    p.req = dataclasses.replace(base, cost_weight=1.0, latency_weight=0.0)
    assert p.cost[choose(p, front)] == p.cost[front].min()
    p.req = dataclasses.replace(base, cost_weight=0.0, latency_weight=1.0)
    assert p.max_rtt[choose(p, front)] == p.max_rtt[front].min()


def test_infeasible_limits_name_the_binding_limit_and_relaxations_that_work(catalog, seed_sites):
    req = Requirements(max_cost=20.0, max_latency_ms=120.0)
    with pytest.raises(Infeasible) as info:
        plan(Placement(catalog, seed_sites, req))
    message = str(info.value)
    assert "max cost $20.00 binds" in message and "max latency 120 ms binds" in message
    assert "Cheapest relaxation: raise max cost to" in message and "Fastest relaxation" in message
    # Each suggested relaxation, applied, makes the plan feasible.
    for relaxed in info.value.relaxations.values():
        ok = dataclasses.replace(
            req,
            max_cost=float(relaxed["max_cost_usd"]) + 1e-9,
            max_latency_ms=float(relaxed["max_latency_ms"]),
        )
        result = plan(Placement(catalog, seed_sites, ok))
        assert result.chosen >= 0


def test_cost_limit_alone_binds_and_its_relaxation_keeps_the_latency_limit(catalog, seed_sites):
    req = Requirements(max_cost=31.0, max_latency_ms=250.0)
    with pytest.raises(
        Infeasible, match=r"max cost \$31.00 binds.*Cheapest relaxation: raise max cost to \$31"
    ) as info:
        plan(Placement(catalog, seed_sites, req))
    assert info.value.relaxations["cheapest"]["max_latency_ms"] <= 250


def test_latency_limit_alone_can_bind(catalog, seed_sites):
    with pytest.raises(
        Infeasible, match=r"max latency 50 ms binds: no region is that close to every participant"
    ):
        plan(Placement(catalog, seed_sites, Requirements(max_latency_ms=50)))


def test_currency_limits_convert_to_usd(catalog, seed_sites):
    req = Requirements(max_cost=85000, currency=Currency("KRW", 1450.0))
    assert req.max_cost_usd == pytest.approx(58.62, abs=0.01)
    p = Placement(catalog, seed_sites, req)
    assert np.all(p.cost[p.feasible] <= 85000 / 1450)


def test_baseline_is_first_participants_region_on_4_vcpu_16_gib(catalog, seed_sites):
    p = Placement(catalog, seed_sites, Requirements())
    cloud, region, itype = p.default_baseline()
    assert (cloud, region) == ("aws", "us-east-1")
    price = catalog.prices[(cloud, region, itype)]
    assert (price.vcpu, price.memory_gib) == (4, 16)
    e = p.evaluate_outside(cloud, region, itype)
    assert e.cost_usd == pytest.approx(price.usd_per_hour * 730 + e.egress_usd)


def test_every_candidate_is_priced_from_the_catalog(catalog, seed_sites):
    p = Placement(catalog, seed_sites, Requirements())
    for i in itertools.islice(range(len(p.candidates)), 0, None, 97):
        c = p.candidates[i]
        assert p.vm_usd[i] == pytest.approx(
            catalog.prices[(c.cloud, c.region, c.instance_type)].usd_per_hour * 730
        )


# -- regional aggregators ------------------------------------------------------------------


def test_regional_aggregators_beat_random_search_of_equal_budget(catalog):
    from fedfleet.core.placement import hierarchy

    rng = np.random.default_rng(7)
    keys = sorted(catalog.regions)
    sites = [site(catalog, *keys[i]) for i in rng.choice(len(keys), 30)]
    h = hierarchy.Hierarchy.build(Placement(catalog, sites, Requirements()))
    ours = hierarchy.nsga2(h, 3, evaluations=1500, seed=0)
    rand = hierarchy.random_search(h, 3, evaluations=1500, seed=0)
    hv = hierarchy.hypervolumes({"nsga2": ours, "random": rand})
    assert hv["nsga2"] > hv["random"]
    # Every point is a real evaluation of some set of 3 regions.
    cost, latency = ours[0]
    assert np.isfinite(cost) and np.isfinite(latency)


def test_regional_evaluation_assigns_each_participant_to_its_nearest_aggregator(catalog, seed_sites):
    from fedfleet.core.placement import hierarchy

    h = hierarchy.Hierarchy.build(Placement(catalog, seed_sites, Requirements()))
    # One regional aggregator in each participant's own region: latency is then the
    # worst (own-region RTT + that region's RTT to the top aggregator).
    own = np.array([h.regions.index(s.key) for s in seed_sites])
    cost, latency = h.evaluate(own[None, :])[0]
    among = h.rtt_rr[np.ix_(own, own)]
    top = int(among.max(axis=1).argmin())
    expected = max(h.rtt_rp[own[i], i] + among[i, top] for i in range(3))
    assert latency == pytest.approx(expected)
    assert cost > h.placement.vm_usd[h.cheapest[own]].sum()  # VMs plus egress
