"""AdapterView: the base model and each adapter on one copy of the weights, used safely."""

import pytest
import torch

from refine_af_pipeline.llm.adapters import AdapterView, merged
from resources import LanguageModelResource

pytestmark = pytest.mark.graph


@pytest.fixture()
def shared(tiny_model_dir, tmp_path):
    """(resource, {"base": view, "tuned": view}) over a tiny model with a non-zero adapter."""
    from peft import get_peft_model

    from refine_af_pipeline.training.trainer_setup import lora_config

    resource = LanguageModelResource(model=str(tiny_model_dir), device="cpu")
    peft = get_peft_model(resource.load()[0], lora_config(4, 8))
    torch.manual_seed(2)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "adapter")
    views, _, _, _ = resource.load_variants({"base": None, "tuned": str(tmp_path / "adapter")})
    return resource, views


def _logits(model):
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_other_views_refuse_to_run_while_an_adapter_is_merged(shared):
    _, views = shared
    with merged(views["tuned"]):
        _logits(views["tuned"])
        with pytest.raises(RuntimeError, match="'tuned' is merged into the shared weights"):
            _logits(views["base"])
    _logits(views["base"])  # fine again once unmerged


def test_a_view_call_restores_the_training_mode(shared):
    _, views = shared
    peft = views["tuned"].peft_model
    peft.train()
    _logits(views["base"])
    _logits(views["tuned"])
    assert peft.training
    assert not any(p.requires_grad for n, p in peft.named_parameters() if "lora_" in n)  # loaded frozen


def test_merging_in_bfloat16_leaves_the_weights_alone(shared):
    _, views = shared
    peft = views["tuned"].peft_model.to(torch.bfloat16)
    before = {n: p.clone() for n, p in peft.named_parameters() if "lora_" not in n}
    expected = _logits(views["tuned"])
    with merged(views["tuned"]) as view:
        assert torch.equal(_logits(view), expected)  # not merged: the same unmerged computation
    after = dict((n, p) for n, p in peft.named_parameters() if "lora_" not in n)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_an_unbound_view_answers_getattr_with_its_default():
    view = AdapterView()
    assert getattr(view, "config", None) is None
    with pytest.raises(AttributeError, match="not bound"):
        _ = view.generation_config
