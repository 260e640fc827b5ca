"""Import path that vLLM's attention-backend registry resolves in worker processes
(``vllm_compat.CPU_BACKEND_PATH``): CPU_ATTN with our hooks (:mod:`.hooks`) after each layer."""

from specapprox_vllm.vllm_compat import make_cpu_backend
from specapprox_vllm.worker.hooks import after_attention, on_step

CaptureCPUBackend = make_cpu_backend(after_attention, on_step)
