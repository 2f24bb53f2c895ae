"""steer-actors: steer and read the residual stream of vLLM-served LLMs, distributed with Ray."""

from .config import VLLMSteeringConfig
from .handles import CaptureHandle, fetch_captures_batch
from .results import GenerationResult
from .specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

__all__ = [
    "VLLMSteerModel", "VLLMSteeringConfig", "GenerationResult", "CaptureHandle", "fetch_captures_batch",
    "SteeringSpec", "LayerSteeringSpec", "AddSpec", "ProjectionCapSpec", "AblationSpec",
]


def __getattr__(name: str):
    # The client pulls in Ray Serve; keep `import steer_actors` light for vLLM worker processes.
    if name == "VLLMSteerModel":
        from .client import VLLMSteerModel

        return VLLMSteerModel
    raise AttributeError(name)
