"""Server-side speculation counters from a specserve /metrics page, per drafter arm."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

DRAFTS = "specserve:spec_decode_num_drafts"
DRAFT_TOKENS = "specserve:spec_decode_num_draft_tokens"
ACCEPTED = "specserve:spec_decode_num_accepted_tokens"
COUNTERS = (DRAFTS, DRAFT_TOKENS, ACCEPTED)

Counters = dict[str, dict[str, float]]  # arm -> counter name -> value


@dataclass
class ArmAcceptance:
    """What one arm drafted and had accepted during the benchmark (after minus before)."""

    num_drafts: float
    num_draft_tokens: float
    num_accepted_tokens: float

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per drafted step: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


def parse_counters(text: str) -> Counters:
    """The three spec-decode counters of a Prometheus text page, by `arm` label; other metrics are ignored."""
    out: Counters = {}
    for family in text_string_to_metric_families(text):
        # Typed counters lose "_total" from the family name, untyped ones keep it; "_created" is skipped.
        name = family.name.removesuffix("_total")
        if name not in COUNTERS:
            continue
        for sample in family.samples:
            if sample.name in (name, f"{name}_total"):
                values = out.setdefault(sample.labels.get("arm", ""), {})
                values[name] = values.get(name, 0.0) + sample.value
    return out


async def scrape(session: aiohttp.ClientSession, base_url: str, timeout_s: float = 10.0) -> Counters | None:
    """The counters ({} before any drafting, or at another server's page), None without a /metrics page."""
    try:
        async with session.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    try:
        return parse_counters(text)
    except ValueError:  # not Prometheus text
        return None


def acceptance_delta(before: Counters, after: Counters) -> dict[str, ArmAcceptance]:
    """Per-arm change over the run; arms that drafted nothing meanwhile are left out."""
    out = {}
    for arm, values in after.items():
        prev = before.get(arm, {})
        delta = {name: values.get(name, 0.0) - prev.get(name, 0.0) for name in COUNTERS}
        if delta[DRAFTS] > 0 or delta[DRAFT_TOKENS] > 0:
            out[arm] = ArmAcceptance(delta[DRAFTS], delta[DRAFT_TOKENS], delta[ACCEPTED])
    return out
