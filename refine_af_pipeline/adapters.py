"""One copy of the base weights for every model a step needs.

A step that compares or judges models (the RL reward's judge, the held-out check's base model,
the evaluation's base and fine-tuned models) used to load the base weights once per model. With
LoRA the weights differ only in the adapters, so one PEFT model can serve them all: PEFT's
`disable_adapter()` gives the base model, `set_adapter(name)` one adapter. `AdapterView` is such a
model as the generation and scoring code sees it (callable, `generate`, `parameters`, `config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class AdapterView:
    """A PEFT model with one adapter active (`adapter` = its name) or with every adapter switched
    off (`adapter` None: the base model). Each call selects it, in eval mode, and restores the
    training mode afterwards, so a view can read a policy while a trainer trains it.

    The PEFT model may be bound later (`bind`): the RL reward's judge is built before the trainer
    wraps the policy in its LoRA adapter."""

    def __init__(self, peft_model=None, adapter: str | None = None):
        self._peft = peft_model
        self.adapter = adapter
        self._merged = False

    def bind(self, peft_model) -> None:
        self._peft = peft_model

    @property
    def peft_model(self):
        if self._peft is None:
            raise RuntimeError("this AdapterView is not bound to a PEFT model yet")
        return self._peft

    @contextmanager
    def selected(self) -> Iterator[object]:
        peft = self.peft_model
        was_training = peft.training
        peft.eval()
        try:
            if self.adapter is None:
                with peft.disable_adapter():
                    yield peft
            else:
                if not self._merged:
                    peft.set_adapter(self.adapter)
                yield peft
        finally:
            peft.train(was_training)

    @contextmanager
    def merged(self) -> Iterator[AdapterView]:
        """Inside, this adapter is folded into the base weights, so calls skip the LoRA matmuls
        (generation with an unmerged all-linear LoRA took ~25% longer on 2 CPU cores). The other
        views of the same model must not be used meanwhile; the weights are restored on exit."""
        if self.adapter is None:
            yield self
            return
        peft = self.peft_model
        peft.set_adapter(self.adapter)
        peft.merge_adapter()
        self._merged = True
        try:
            yield self
        finally:
            peft.unmerge_adapter()
            self._merged = False

    def __call__(self, *args, **kwargs):
        with self.selected() as model:
            return model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.selected() as model:
            return model.generate(*args, **kwargs)

    def parameters(self):
        return self.peft_model.parameters()

    def __getattr__(self, name: str):
        # config, generation_config, name_or_path, device ... come from the shared model.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.peft_model, name)


@contextmanager
def merged(model) -> Iterator[object]:
    """`model` with its adapter merged if it is an AdapterView; any other model as it is."""
    if isinstance(model, AdapterView):
        with model.merged() as view:
            yield view
    else:
        yield model


def attach_adapters(model, adapters: Mapping[str, str]):
    """`model` with each LoRA adapter directory in `adapters` loaded under its name (one copy of
    the base weights; the adapters add their own small matrices)."""
    from peft import PeftModel

    names = list(adapters)
    if not names:
        raise ValueError("no adapters to attach")
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.eval()
    return peft
