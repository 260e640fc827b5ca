"""The FastAPI / OpenAI-compatible front end of specapprox-vllm."""
