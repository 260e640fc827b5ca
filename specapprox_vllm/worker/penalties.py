"""Import path of the target engine's custom logits processor
(``vllm_compat.PENALTY_PROCESSOR_PATH``, ``--logits-processors``): presence, frequency and
repetition penalties of a KV-compacted decode request counted over the prompt it stands for.

Why: a decode request's own prompt is ``C`` placeholder tokens plus ``P[L-1]`` (plus, after a
self-drafted lookahead, the answer's first tokens), so vLLM's penalties would count those
instead of the user's prompt and outputs. :meth:`TargetKVRunner.decode_request
<specapprox_vllm.frontend.target_runner.TargetKVRunner.decode_request>` moves the request's
penalties into ``extra_args[PENALTY_KEY]`` with the real prompt and the lookahead, and this
processor applies them with vLLM's own penalty code, where vLLM would have.
"""

from specapprox_vllm.vllm_compat import make_penalty_processor
from specapprox_vllm.wire import PENALTY_KEY

RealPromptPenalties = make_penalty_processor(PENALTY_KEY)
