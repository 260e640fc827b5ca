"""Import path that vLLM's attention-backend registry resolves in worker processes
(``vllm_compat.CPU_BACKEND_PATH``); the class itself is built in :mod:`vllm_compat`."""

from specapprox_vllm.vllm_compat import make_capture_cpu_backend

CaptureCPUBackend = make_capture_cpu_backend()
