import pytest

from conftest import RECIPES
from polymodal.config import ModelConfig, apply_overrides, from_dict, load_recipe
from polymodal.connectors.mlp import MLPConnectorConfig
from polymodal.encoders.multi import MultiEncoderConfig
from polymodal.errors import ConfigError, UserError


def test_kinds_pick_their_own_dataclass():
    config = from_dict(ModelConfig, {
        "llm": {"source": "tiny:llama", "lora": {"r": 4}},
        "encoder": {"kind": "multi", "parts": [{"kind": "hf", "source": "tiny:clip"},
                                               {"kind": "hf", "source": "tiny:dinov2"}]},
        "connector": {"kind": "mlp", "depth": 3},
    })
    connector, encoder = config.connectors["image"], config.encoders["image"]  # the old spelling: image's
    assert isinstance(connector, MLPConnectorConfig) and connector.depth == 3
    assert isinstance(encoder, MultiEncoderConfig)
    assert encoder.parts[1].source == "tiny:dinov2"
    assert config.llm.lora.r == 4 and config.llm.lora.alpha == 32


@pytest.mark.parametrize("data, message", [
    ({"connector": {"kind": "mlp", "depth": "two"}, "encoder": {"kind": "vit"}},
     "connector.depth: expected int, got 'two'"),
    ({"connector": {"kind": "mlp", "widht": 3}, "encoder": {"kind": "vit"}}, "connector.widht: unknown field"),
    ({"connector": {"kind": "mpl"}, "encoder": {"kind": "vit"}}, "unknown connector 'mpl'; known: cabstractor"),
    ({"llm": {"dtype": "float64"}}, "llm.dtype: expected one of float32, bfloat16, float16"),
    ({"encoder": {"kind": "vit"}}, "^connector: required"),
    ({"llm": {"lora": {"target_modules": "q_proj"}}}, "llm.lora.target_modules: expected a list"),
])
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict(ModelConfig, data)


def test_overrides_parse_values_as_yaml():
    data = apply_overrides({"model": {"connector": {"kind": "mlp"}}},
                           ["model.connector.depth=3", "model.llm.lora.target_modules=[q_proj, v_proj]",
                            "model.llm.source=tiny:qwen2"])
    assert data["model"]["connector"]["depth"] == 3
    assert data["model"]["llm"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["model"]["llm"]["source"] == "tiny:qwen2"
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["model.connector.depth"])


def test_recipe_file_with_overrides(tmp_path):
    recipe = load_recipe(f"{RECIPES}/tiny-llava.yaml", ["model.connector.depth=1"])
    assert recipe.name == "tiny-llava" and recipe.model.connectors["image"].depth == 1
    with pytest.raises(UserError, match="config file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
