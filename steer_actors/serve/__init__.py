"""Ray Serve app: HTTP/handle ingress -> steering coordinator -> vLLM engine actors.

``serve run examples/tiny_cpu.yaml`` (``import_path: steer_actors.serve:build_app``) or, in Python,
``serve.run(build_app(cfg))``.
"""

from steer_actors.serve.app import COORDINATOR, INGRESS, build_app

__all__ = ["COORDINATOR", "INGRESS", "build_app"]
