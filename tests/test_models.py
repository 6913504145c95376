import pytest
import torch

from persona_ops.errors import InputError
from persona_ops.models.loading import LoadedModel, decoder_layers, resolve_dtype, tiny_model
from persona_ops.models.refs import base_label, split_revision


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "olmo2", "gemma2", "mistral"])
def test_decoder_layers_and_hidden_state_rows_for_each_layout(arch, smol_tokenizer):
    model = tiny_model(arch, num_layers=3, hidden=64, vocab_tokenizer=smol_tokenizer)
    loaded = LoadedModel(model=model, tokenizer=smol_tokenizer, label=f"tiny-{arch}")
    assert len(decoder_layers(model)) == 3 and loaded.num_layers == 3 and loaded.hidden_size == 64
    ids = torch.tensor([smol_tokenizer.encode("hello world")])
    with torch.no_grad():
        hs = loaded.backbone(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hs) == loaded.num_layers + 1  # row 0 = embeddings, row L = output of block L-1


def test_model_refs_and_labels():
    assert split_revision("allenai/OLMo-2-1124-7B-Instruct@step_60") == ("allenai/OLMo-2-1124-7B-Instruct", "step_60")
    assert split_revision("Qwen/Qwen3-4B", "main") == ("Qwen/Qwen3-4B", "main")
    assert base_label("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B@main"
    assert base_label("embedded").startswith("HuggingFaceTB/SmolLM2-135M-Instruct@")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(InputError, match="model.dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_missing_model_is_an_input_error(tmp_path):
    from persona_ops.models.loading import load_model

    with pytest.raises(InputError, match="could not be loaded"):
        load_model(str(tmp_path / "no-such-model"))
