"""Performance simulators: systolic GEMM core, PLENA LLM accelerator, GPU/TPU baselines,
layer-pipelined dataflow accelerator. Plain numpy libraries; nothing here imports ``dse``."""
