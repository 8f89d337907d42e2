"""`POST /v1/topk_logprobs`: the binary top-k frame (schemas in :mod:`shared.protocol`)."""
