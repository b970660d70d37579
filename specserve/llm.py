"""The offline library entry point, shaped like vLLM's `LLM`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from specserve.config import EngineConfig
from specserve.engine import LLMEngine
from specserve.models.loader import LoadedModel
from specserve.outputs import RequestOutput
from specserve.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once, then `generate` or `chat` over batches of prompts.

    Keyword arguments beyond these are EngineConfig fields; `loaded_model` reuses weights already in memory.
    """

    def __init__(
        self,
        model: str | None = None,
        speculative_config: dict | str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        loaded_model: LoadedModel | None = None,
        **engine_kwargs: Any,
    ):
        config = EngineConfig(
            model=model, speculative_config=speculative_config, device=device, dtype=dtype, **engine_kwargs
        )
        self.engine = LLMEngine(config, loaded_model)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        spec_arm: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, plist, strict=True):
            rid = f"gen-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p, spec_arm=spec_arm)
            order.append(rid)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), disable=not use_tqdm, desc="generate") as bar:
            while len(done) < len(order):
                for out in self.engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[rid] for rid in order]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        spec_arm: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.encode_chat(conv) for conv in convs]
        return self.generate(prompts, params, use_tqdm=use_tqdm, spec_arm=spec_arm)

    def encode_chat(self, conversation: list[Message]) -> list[int]:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)
