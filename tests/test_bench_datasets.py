"""Dataset loaders and drafter-arm parsing of `specserve bench`."""

from __future__ import annotations

import json

import pytest

from specserve.bench.arm_specs import arms_from_drafter_config, parse_arm, parse_drafters
from specserve.bench.datasets import DatasetError, load_dataset, load_jsonl


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_mt_bench_has_two_turns_and_round_robins_categories():
    prompts = load_dataset("mt_bench", num_prompts=8)
    assert len(prompts) == 8
    assert all(len(p.turns) == 2 and p.chat for p in prompts)
    assert len({p.category for p in prompts}) == 8  # the file is sorted by category; 8 prompts cover all 8


def test_mt_bench_missing_data_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("specserve.bench.datasets.default_data_dir", lambda: tmp_path)
    with pytest.raises(DatasetError, match="MT-bench data not found.*--dataset"):
        load_dataset("mt_bench")


def test_humaneval_is_plain_completion():
    prompts = load_dataset("humaneval", num_prompts=3)
    assert [p.prompt_id for p in prompts] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(
        not p.chat and p.category == "humaneval" and p.turns[0].lstrip().startswith(("from", "def", "import"))
        for p in prompts
    )


def test_plain_jsonl_prompts(tmp_path):
    path = _write(tmp_path, [{"prompt": "hi", "category": "greet"}, "", {"id": "x", "prompt": "bye"}])
    prompts = load_jsonl(path)
    assert [(p.prompt_id, p.category, p.turns) for p in prompts] == [
        ("1", "greet", ("hi",)),
        ("x", "default", ("bye",)),
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["{not json"], r"data.jsonl:1: not valid JSON"),
        ([[1, 2]], r"data.jsonl:1: each line must be a JSON object"),
        ([{"prompt": "a"}, {"text": "b"}], r"data.jsonl:2: needs a 'turns' list or a 'prompt' string"),
        ([{"turns": []}], r"non-empty strings"),
        ([{"prompt": ""}], r"non-empty strings"),
        ([""], r"holds no prompts"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, lines, message):
    with pytest.raises(DatasetError, match=message):
        load_jsonl(_write(tmp_path, lines))


def test_missing_file_and_bad_count(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetError, match="num_prompts must be >= 1"):
        load_dataset("mt_bench", num_prompts=0)


def test_parse_drafters_puts_baseline_first():
    arms = parse_drafters("ngram,ngram:k=8, eagle:/ckpt/eagle-smollm:k=6")
    assert [a.name for a in arms] == ["none", "ngram", "ngram:k=8", "eagle:eagle-smollm:k=6"]
    assert arms[0].speculative_config is None
    assert arms[2].speculative_config == {"method": "ngram", "num_speculative_tokens": 8}
    assert arms[3].speculative_config == {
        "method": "eagle",
        "model": "/ckpt/eagle-smollm",
        "num_speculative_tokens": 6,
    }
    assert parse_arm("medusa:/m:tree=[[0],[0,0]]").speculative_config["tree"] == [[0], [0, 0]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "drafter 'bogus': speculative_config.method must be one of"),
        ("ngram:k=0", "num_speculative_tokens must be in"),
        ("eagle", "model .* is required"),
        ("ngram:colour=red", "unknown speculative_config keys"),
        ("none:k=3", "'none' takes no options"),
        ("ngram,ngram", "named twice"),
        (",", "names no arms"),
    ],
)
def test_parse_drafters_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_drafters(spec)


def test_arms_from_the_servers_drafter_config(tmp_path):
    path = tmp_path / "arms.toml"
    spec = '{ method = "ngram", num_speculative_tokens = 4 }'
    ngram = f'{{ name = "ngram4", weight = 0.8, speculative_config = {spec} }}'
    path.write_text(f'["SmolLM2-135M-Instruct"]\narms = [ {{ name = "baseline", weight = 0.2 }}, {ngram} ]\n')
    arms = arms_from_drafter_config(str(path), "SmolLM2-135M-Instruct")
    assert [(a.name, a.speculative_config) for a in arms] == [
        ("baseline", None),
        ("ngram4", {"method": "ngram", "num_speculative_tokens": 4}),
    ]
    with pytest.raises(ValueError, match="has no table for the served model 'other'"):
        arms_from_drafter_config(str(path), "other")
    path.write_text('["m"]\narms = [ { name = "x", speculative_config = { method = "nope" } } ]\n')
    with pytest.raises(ValueError, match="method must be one of"):
        arms_from_drafter_config(str(path), "m")
    path.write_text("not toml [")
    with pytest.raises(ValueError, match="not valid TOML"):
        arms_from_drafter_config(str(path), "m")
