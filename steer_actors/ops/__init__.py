"""The steering ops themselves: pure fp32 math on the residual stream, the fixed-slot row layout the workers
hold, the rows a change travels as, and the fused custom op. No vLLM, no Ray: importable anywhere."""
