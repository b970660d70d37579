"""Self-instruct: the target writes more training prompts, each begun with a training prompt's opening words.

A drafter learns the target's behaviour only on the topics its prompts reach: 427 instructions answered 33
times each left a 0.1 gap between training and held-out top-1. So the target itself writes new user turns:
the chat template is opened up to the user's message, the first one to three words of a random training
prompt are put in, and the target continues the user's turn (sampled) until it closes it. Nothing but the
training prompts and the target goes in; turns that never close, or repeat another, are dropped.
"""

from __future__ import annotations

import random

from specserve.drafters.train_data import DistillPlan, distill

SENTINEL = "\x00SELF_INSTRUCT\x00"


def user_turn(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a lone user message's content (system prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    before, after = text.split(SENTINEL)
    return before, after


def turn_end_ids(tokenizer, after: str, eos_token_ids) -> set[int]:
    """Tokens that close the user's turn: the template's end-of-turn token (ChatML's <|im_end|>) and eos."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return set(eos_token_ids) | {i for i in tokenizer.encode(after, add_special_tokens=False)[:1] if i in special}


def openings(seeds: list[str], num: int, rng: random.Random) -> list[str]:
    """num openings: the first 1-3 words of seed prompts drawn at random (fewer when the seed is shorter)."""
    out = []
    for _ in range(num):
        words = rng.choice(seeds).split()
        out.append(" ".join(words[: rng.randint(1, 3)]))
    return out


def write_prompts(model, backend, tokenizer, seeds: list[str], num: int, device, *, seed: int = 0,
                  temperature: float = 1.0, max_tokens: int = 96, batch_size: int = 1024) -> list[str]:
    """Up to num new prompts by the target, distinct from each other and from the seeds, in order written.

    Draws 1.5 x num openings: some turns run past max_tokens or repeat, and are dropped.
    """
    rng = random.Random(seed)
    starts = openings(seeds, num + num // 2, rng)
    before, after = user_turn(tokenizer)
    ids = [tokenizer.encode(before + s, add_special_tokens=False) for s in starts]
    end_ids = turn_end_ids(tokenizer, after, model.config.eos_token_ids)
    plan = DistillPlan(ids, [temperature], 1, max_tokens, batch_size, seed)
    data = distill(model, backend, plan, end_ids, device, meta={})
    seen = {" ".join(s.lower().split()) for s in seeds}
    out = []
    for i, start in enumerate(starts):
        seq = data.tokens[data.offsets[i] + data.prompt_lens[i] : data.offsets[i + 1]].tolist()
        if not seq or seq[-1] not in end_ids:
            continue  # the turn never closed within max_tokens
        text = (start + tokenizer.decode(seq[:-1], skip_special_tokens=True)).strip()
        key = " ".join(text.lower().split())
        if len(text.split()) < 3 or key in seen:
            continue
        seen.add(key)
        out.append(text)
        if len(out) == num:
            break
    return out
