"""Ray Serve app: HTTP/handle ingress + steering coordinator + vLLM engine actors."""

from .app import COORDINATOR, INGRESS, build_app

__all__ = ["COORDINATOR", "INGRESS", "build_app"]
