"""The fedfleet Pulumi program (`pulumi up` with main: infra/): compose, don't decide.

Reads the validated plan (infra/config.py), builds one aggregator and one site per
participant on each one's cloud through an explicit provider per (cloud, region),
and exports `inventory`: the only thing Ansible and the runner read.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a directory by Pulumi

import pulumi

from infra import aws, azure, config, gcp
from infra.common import AggregatorArgs, SiteArgs, Tags

CLOUDS = {"aws": aws, "gcp": gcp, "azure": azure}

plan, accounts = config.load()
tags = Tags(plan.stack)
providers = {(cloud, region): CLOUDS[cloud].provider(region, accounts) for cloud, region in plan.locations}

sites = {
    site.participant: CLOUDS[site.cloud].ParticipantSite(
        f"site-{site.participant}",
        SiteArgs(site, plan.operator, tags),
        pulumi.ResourceOptions(provider=providers[(site.cloud, site.region)]),
    )
    for site in plan.sites
}
agg = plan.aggregator
# A stack may give the aggregator by address (a machine of its own): then only the sites.
aggregator = (
    None
    if agg is None
    else CLOUDS[agg.cloud].Aggregator(
        "aggregator",
        AggregatorArgs(
            agg,
            plan.operator,
            tags,
            # The sites' NAT addresses and the ranges of participants with machines of their own.
            pulumi.Output.all(*(s.egress_ip for s in sites.values())).apply(
                lambda ips: [*ips, *plan.own_sources]
            ),
        ),
        pulumi.ResourceOptions(provider=providers[(agg.cloud, agg.region)]),
    )
)


def _inventory(out: dict) -> dict:
    """The `inventory` output: what Pulumi created (fedfleet adds the hosts given by address)."""
    return {
        "stack": plan.stack,
        "aggregator": None
        if agg is None
        else {
            "name": "aggregator",
            "cloud": agg.cloud,
            "region": agg.region,
            "instance_type": agg.instance_type,
            "address": out["public_ip"],
            "private_ip": out["private_ip"],
            "port": agg.port,
        },
        "participants": out["sites"],
    }


pulumi.export(
    "inventory",
    pulumi.Output.all(
        public_ip=aggregator.public_ip if aggregator else None,
        private_ip=aggregator.private_ip if aggregator else None,
        sites={name: site.vms for name, site in sites.items()},
    ).apply(_inventory),
)
