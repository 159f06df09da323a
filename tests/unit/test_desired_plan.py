"""ServicePlan's decisions that every mode translates: what the external chain does, and what
happens to traffic no endpoint can take."""

from __future__ import annotations

import pytest

from agent.model.desired import ServicePlan
from agent.model.endpoints import EndpointInfo
from agent.model.serviceport import ServicePortInfo, ServicePortName

SPN = ServicePortName("shop", "web", "http", "TCP")
HERE = EndpointInfo("10.244.1.2", 8080, node_name="node1")
THERE = EndpointInfo("10.244.2.2", 8080, node_name="node2")


def info(**kw: object) -> ServicePortInfo:
    return ServicePortInfo(name=SPN, family=4, protocol="TCP", port=80, cluster_ip="10.96.0.1", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "plan", "steps", "external", "internal"),
    [
        ("ClusterIP only: no external chain", ServicePlan(info(), (HERE,), (), True), (), None, None),
        ("NodePort, ETP Cluster: masquerade then any endpoint",
         ServicePlan(info(node_port=30080), (HERE, THERE), (), True),
         ("masquerade-to-cluster",), None, None),
        ("NodePort, no endpoints anywhere: reject everything",
         ServicePlan(info(node_port=30080), (), (), False), (), "reject", "reject"),
        ("ETP Local with a local endpoint: pods and node short-circuit, others local",
         ServicePlan(info(node_port=30080, external_policy_local=True), (HERE, THERE), (HERE,), True),
         ("pods-to-cluster", "node-to-cluster", "to-local"), None, None),
        ("ETP Local, endpoints only elsewhere: external traffic dropped, cluster IP still served",
         ServicePlan(info(node_port=30080, external_policy_local=True), (THERE,), (), True),
         ("pods-to-cluster", "node-to-cluster"), "drop", None),
        ("ITP Local, endpoints only elsewhere: cluster IP traffic dropped",
         ServicePlan(info(internal_policy_local=True), (), (), True), (), None, "drop"),
    ],
)
def test_plan_decisions(case: str, plan: ServicePlan, steps: tuple[str, ...], external: str | None,
                        internal: str | None) -> None:
    assert plan.external_steps == steps, case
    if plan.info.externally_accessible:
        assert plan.external_unserved == external, case
    assert plan.internal_unserved == internal, case
