"""The model's generation_config.json read with transformers' meaning (tpi.generation_config)."""
from __future__ import annotations

import json

import pytest
from transformers import GenerationConfig as HFGenerationConfig

from tpi.generation_config import load_generation_config


def write(tmp_path, cfg) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)


@pytest.mark.parametrize("cfg", [
    {"bos_token_id": 1, "eos_token_id": 2},                                    # SmolLM2's
    {"do_sample": False, "temperature": 0.6, "eos_token_id": [2, 7]},
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2},  # Llama 3's
    {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8},         # Qwen's
    {"do_sample": True},
])
def test_defaults_match_what_transformers_would_sample_with(tmp_path, cfg):
    write(tmp_path, cfg)
    ours = load_generation_config(tmp_path)
    hf = HFGenerationConfig.from_pretrained(tmp_path)
    if not hf.do_sample:
        assert ours.temperature == 0.0
    else:
        # transformers 5 leaves unset fields None and fills them at generate() time with
        # temperature 1.0, top_p 1.0, top_k 50
        hf_values = [v if v is not None else d for v, d in zip((hf.temperature, hf.top_p, hf.top_k), (1.0, 1.0, 50))]
        assert [ours.temperature, ours.top_p, ours.top_k] == hf_values
    eos = hf.eos_token_id
    assert set(ours.eos_token_ids) == set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def test_no_file_gives_the_openai_defaults(tmp_path):
    g = load_generation_config(tmp_path)
    assert (g.temperature, g.top_p, g.top_k, g.eos_token_ids) == (1.0, 1.0, 0, ())


@pytest.mark.parametrize("text,cause", [
    ("{", "Expecting"), ("[1]", "not a JSON object"),
    ('{"do_sample": true, "temperature": "hot"}', "temperature"),
    ('{"do_sample": true, "top_p": NaN}', "top_p"),
    ('{"eos_token_id": "2"}', "eos_token_id"),
])
def test_a_broken_file_is_refused_by_name(tmp_path, text, cause):
    write(tmp_path, text)
    with pytest.raises(ValueError, match=cause) as e:
        load_generation_config(tmp_path)
    assert "generation_config.json" in str(e.value)
