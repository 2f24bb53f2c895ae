"""Bench-only worker extension: the seed's approach (eager forward hooks adding a vector on every
layer), installed through collective_rpc so the baseline runs on stock vLLM with no patch."""

from __future__ import annotations


class HookExtension:
    def bench_install_hooks(self, scale: float, seed: int = 0) -> int:
        import torch

        model = self.model_runner.get_model()
        layers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].isdigit() and ".layers." in f".{n}"]
        hidden = self.vllm_config.model_config.get_hidden_size()  # weights may be repacked (CPU): not their shape
        g = torch.Generator().manual_seed(seed)
        handles = []
        for layer in layers:
            v = (torch.randn(hidden, generator=g) * scale).to(next(layer.parameters()).device)

            def hook(_m, _i, out, v=v):
                delta, residual = out
                return (delta.float() + v).to(delta.dtype), residual

            handles.append(layer.register_forward_hook(hook))
        self._bench_hooks = handles
        return len(handles)
