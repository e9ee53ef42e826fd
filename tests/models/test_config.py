import pytest

from catkit.models import ModelConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"pattern": "AXA"}, "pattern"),
        ({"pattern": ""}, "pattern"),
        ({"d_model": 130, "n_heads": 4}, "d_model"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"d_model": -8}, "d_model"),
        ({"n_heads": 0}, "n_heads"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"ffn_hidden": -5}, "ffn_hidden"),
        ({"n_experts": -1}, "n_experts"),
        ({"n_experts": 4, "moe_top_k": 5}, "moe_top_k"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_round_trip_dict():
    cfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, n_experts=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
