"""Drafter A/B files and per-request arm choice."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from specserve.config import SpeculativeConfig
from specserve.server.arms import Arm, ArmSelector, arms_for_model, engine_arms, load_drafter_config
from specserve.server.errors import APIError
from specserve.server.protocol import SpeculativeChoice

GOOD = """
["SmolLM2-135M-Instruct"]
arms = [
  { name = "baseline", weight = 1 },
  { name = "ngram4", weight = 3, speculative_config = { method = "ngram", num_speculative_tokens = 4 } },
]

[other-model]
[[other-model.arms]]
name = "ngram2"
speculative_config = { method = "ngram", num_speculative_tokens = 2, prompt_lookup_max = 3 }
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "arms.toml"
    path.write_text(text)
    return str(path)


def test_load_good_file(tmp_path):
    models = load_drafter_config(write(tmp_path, GOOD))
    assert models["SmolLM2-135M-Instruct"] == [
        Arm("baseline", None, 1.0),
        Arm("ngram4", {"method": "ngram", "num_speculative_tokens": 4}, 3.0),
    ]
    assert models["other-model"][0].weight == 1.0
    assert engine_arms(models["SmolLM2-135M-Instruct"]) == {"ngram4": {"method": "ngram", "num_speculative_tokens": 4}}


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("not = [toml", "not valid TOML"),
        ("", "no model tables"),
        ("m = 3", "expected a table"),
        ("[m]\narms = []", "non-empty list"),
        ("[m]\nrouting = 1\narms = [{ name = 'a' }]", "unknown keys ['routing']"),
        ("[m]\narms = [1]", "expected a table"),
        ("[m]\narms = [{ name = 'a', colour = 'red' }]", "unknown keys ['colour']"),
        ("[m]\narms = [{ weight = 1 }]", "'name' must be"),
        ("[m]\narms = [{ name = 'has space' }]", "'name' must be"),
        ("[m]\narms = [{ name = 'a', weight = -1 }]", "'weight' must be"),
        ("[m]\narms = [{ name = 'a', weight = 'x' }]", "'weight' must be"),
        ("[m]\narms = [{ name = 'a', weight = 0 }]", "weight > 0"),
        ("[m]\narms = [{ name = 'a' }, { name = 'a' }]", "repeated: ['a']"),
        ("[m]\narms = [{ name = 'a', speculative_config = { method = 'warp' } }]", "method must be one of"),
        ("[m]\narms = [{ name = 'a', speculative_config = { method = 'ngram', k = 2 } }]", "unknown speculative"),
        ("[m]\narms = [{ name = 'none', speculative_config = { method = 'ngram' } }]", "plain decoding"),
    ],
)
def test_bad_files_are_rejected_with_a_clear_message(tmp_path, text, phrase):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match="drafter config") as info:
        load_drafter_config(path)
    assert phrase in str(info.value)


def test_arms_for_the_served_model(tmp_path):
    path = write(tmp_path, GOOD)
    assert [a.name for a in arms_for_model(path, "other-model")] == ["ngram2"]
    with pytest.raises(ValueError, match="no table for the served model 'gpt-9'"):
        arms_for_model(path, "gpt-9")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_drafter_config(str(tmp_path / "nope.toml"))


CONFIGS = {
    "none": None,
    "ngram:4": SpeculativeConfig("ngram", 4),
    "ngram2": SpeculativeConfig("ngram", 2),
}


def test_explicit_choice_by_name_or_method():
    sel = ArmSelector(CONFIGS, "ngram:4")
    assert sel.choose(None, None).engine_arm == "ngram:4"
    assert sel.choose("none", None).engine_arm == "none"
    assert sel.choose(SpeculativeChoice("ngram", 2), None).engine_arm == "ngram2"
    assert sel.choose(SpeculativeChoice("ngram", 4), "u").engine_arm == "ngram:4"
    for wanted in ("eagle", SpeculativeChoice("ngram", 3), SpeculativeChoice("eagle", None)):
        with pytest.raises(APIError) as info:
            sel.choose(wanted, None)
        assert info.value.status == 400 and info.value.param == "speculative"


def test_ab_draw_follows_weights_and_sticks_per_user():
    ab = [
        Arm("base", None, 1.0),
        Arm("ngram2", {"method": "ngram", "num_speculative_tokens": 2}, 3.0),
        Arm("off", None, 0.0),
    ]
    sel = ArmSelector(CONFIGS, "ngram:4", ab, rng=random.Random(0))
    draws = Counter(sel.choose(None, None).label for _ in range(4000))
    assert set(draws) == {"base", "ngram2"}
    assert 0.70 < draws["ngram2"] / 4000 < 0.80
    users = Counter(sel.choose(None, f"user-{i}").label for i in range(2000))
    assert 0.70 < users["ngram2"] / 2000 < 0.80
    for i in range(20):
        assert len({sel.choose(None, f"user-{i}").label for _ in range(5)}) == 1
    base = sel.choose("base", None)
    assert base.engine_arm == "none" and base.label == "base"
    assert sel.choose("off", None).label == "off"  # weight 0: reachable by name only
