"""steer-actors: steer and read the residual stream of vLLM-served LLMs, distributed with Ray."""

from steer_actors.config import VLLMSteeringConfig
from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
from steer_actors.results import GenerationResult
from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

__all__ = [
    "VLLMSteerModel", "VLLMSteeringConfig", "GenerationResult", "CaptureHandle", "fetch_captures_batch",
    "SteeringSpec", "LayerSteeringSpec", "AddSpec", "ProjectionCapSpec", "AblationSpec",
]


def __getattr__(name: str):
    # The client pulls in Ray Serve; keep `import steer_actors` light for vLLM worker processes.
    if name == "VLLMSteerModel":
        from steer_actors.client.model import VLLMSteerModel

        return VLLMSteerModel
    raise AttributeError(name)
