from pathlib import Path

import pytest
import yaml

from persona_ops.config import Params, apply_overrides, load_params, save_params
from persona_ops.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_validate_and_cover_every_trait():
    p = load_params(ROOT / "params.yaml")
    assert set(p.traits.names) <= set(p.traits.per_trait)
    assert p.model.name == "embedded"


def test_overrides_are_yaml_typed():
    p = load_params(ROOT / "params.yaml", ["generate.max_new_tokens=7", "traits.names=[evil]",
                                           "judge.base_url=http://127.0.0.1:1/v1"])
    assert p.generate.max_new_tokens == 7 and p.traits.names == ["evil"]
    assert p.judge.base_url == "http://127.0.0.1:1/v1"


@pytest.mark.parametrize("override, fragment", [
    ("generate.max_new_tokens=0", "generate.max_new_tokens"),
    ("generate.nope=1", "generate.nope"),
    ("judge.backend=gpt", "judge.backend"),
])
def test_bad_values_name_the_field(tmp_path, override, fragment):
    with pytest.raises(InputError, match=fragment.replace(".", r"\.")):
        load_params(tmp_path / "params.yaml", [override])


def test_override_syntax_error():
    with pytest.raises(InputError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_per_trait_merge_and_unknown_keys():
    p = Params.model_validate({"traits": {"names": ["evil"], "per_trait": {
        "evil": {"assistant_name": "malicious", "filter": {"pos_min": 70}}}}})
    tp = p.for_trait("evil")
    assert tp.assistant_name == "malicious" and tp.params.filter.pos_min == 70
    assert tp.params.filter.neg_max == p.filter.neg_max  # untouched keys keep the global value
    with pytest.raises(ValueError, match="unknown keys"):
        Params.model_validate({"traits": {"per_trait": {"evil": {"fliter": {}}}}})


def test_save_params_keeps_header_and_adds_missing_traits(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# my header\nmodel:\n  name: embedded\n")
    p = load_params(path, ["traits.names=[evil,humorous]"])
    save_params(p, path)
    text = path.read_text()
    assert text.startswith("# my header\n")
    data = yaml.safe_load(text)
    assert data["traits"]["per_trait"]["humorous"] == {"assistant_name": "humorous"}
    assert load_params(path).traits.names == ["evil", "humorous"]


def test_override_from_a_preset_file():
    p = load_params(ROOT / "params.yaml", [
        f"persona_space.trajectory=@{ROOT}/presets/trajectories/olmo2-7b-post-training.yaml",
        f"persona_space.model=@{ROOT}/presets/trajectories/olmo2-7b-reference.yaml"])
    labels = [c.label for c in p.persona_space.trajectory.checkpoints]
    assert labels[:3] == ["base", "sft", "dpo"] and labels[-1] == "instruct" and len(labels) == 10
    assert p.persona_space.trajectory.checkpoints[3].model.revision == "step_60"
    assert p.persona_space.model.name == "allenai/OLMo-2-1124-7B-Instruct"
    with pytest.raises(InputError, match="cannot read"):
        load_params(ROOT / "params.yaml", ["persona_space.trajectory=@/nonexistent.yaml"])
