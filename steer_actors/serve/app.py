"""Builder: one :class:`VLLMSteeringConfig` -> a Serve application (ingress -> coordinator -> engines).

``serve run examples/tiny_cpu.yaml`` or, in Python, ``serve.run(build_app(cfg))``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from steer_actors.config import VLLMSteeringConfig
from steer_actors.control.coordinator import SteeringCoordinator

from steer_actors.serve.ingress import SteerIngress

COORDINATOR = "SteeringCoordinator"
INGRESS = "SteerIngress"


def build_app(args: dict[str, Any] | VLLMSteeringConfig) -> serve.Application:
    cfg = VLLMSteeringConfig.model_validate(args)
    # Replicas of these deployments are light Ray actors; the compute runs in vLLM's own processes,
    # so they claim no CPU (a 2-core machine would otherwise deadlock on placement).
    coordinator = serve.deployment(
        SteeringCoordinator, name=COORDINATOR, num_replicas=1, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.model_dump())
    return serve.deployment(
        SteerIngress, name=INGRESS, num_replicas=1, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(coordinator, cfg.max_body_bytes)
