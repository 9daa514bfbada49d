"""One copy of the base weights for every model a step needs.

A step that compares or judges models (the RL reward's judge, the held-out check's base model,
the evaluation's base and fine-tuned models) needs several models that differ only in their LoRA
adapters, so one PEFT model serves them all: PEFT's `disable_adapter()` gives the base model,
`set_adapter(name)` one adapter. `AdapterView` is such a model as the generation and scoring code
sees it (callable, `generate`, `parameters`, `config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# Attribute on the shared PEFT model naming the view whose adapter is merged into its weights.
_MERGED_BY = "_refine_af_merged_by"


class UnboundView(AttributeError):
    """An AdapterView used before `bind` (an AttributeError, so getattr(view, name, default) works)."""


class AdapterView:
    """A PEFT model with one adapter active (`adapter` = its name) or with every adapter switched
    off (`adapter` None: the base model). Each call selects it, in eval mode, and restores the
    training mode afterwards, so a view can read a policy while a trainer trains it.

    The PEFT model may be bound later (`bind`): the RL reward's judge is built before the trainer
    wraps the policy in its LoRA adapter."""

    def __init__(self, peft_model=None, adapter: str | None = None):
        self._peft = peft_model
        self.adapter = adapter

    def bind(self, peft_model) -> None:
        self._peft = peft_model

    @property
    def peft_model(self):
        if self._peft is None:
            raise UnboundView("this AdapterView is not bound to a PEFT model yet")
        return self._peft

    @contextmanager
    def selected(self) -> Iterator[object]:
        peft = self.peft_model
        holder = getattr(peft, _MERGED_BY, None)
        if holder is not None and holder is not self:
            raise RuntimeError(
                f"adapter {holder.adapter!r} is merged into the shared weights; the view of "
                f"{self.adapter or 'the base model'!r} cannot be used until it is unmerged"
            )
        was_training = peft.training
        peft.eval()
        try:
            if self.adapter is None:
                with peft.disable_adapter():
                    yield peft
            else:
                if holder is None:
                    peft.set_adapter(self.adapter, inference_mode=True)
                yield peft
        finally:
            peft.train(was_training)

    @contextmanager
    def merged(self) -> Iterator[AdapterView]:
        """Inside, this adapter is folded into the base weights, so calls skip the LoRA matmuls
        (an unmerged all-linear LoRA made generation ~25% slower on 2 CPU cores). The other views
        of the same model refuse to run meanwhile; the weights are restored on exit. Only in fp32:
        in bf16 or fp16 a small adapter delta rounds away when merged and the base weights drift
        with every merge and unmerge, so there the adapter stays unmerged."""
        import torch

        peft = self.peft_model
        if self.adapter is None or next(peft.parameters()).dtype != torch.float32:
            yield self
            return
        peft.set_adapter(self.adapter, inference_mode=True)
        try:
            peft.merge_adapter()
            setattr(peft, _MERGED_BY, self)
            yield self
        finally:
            peft.unmerge_adapter()
            setattr(peft, _MERGED_BY, None)

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
        # An AttributeError raised in a property lands here too, so read the model field directly.
        peft = self.__dict__.get("_peft")
        if name.startswith("_"):
            raise AttributeError(name)
        if peft is None or name == "peft_model":
            raise UnboundView(f"this AdapterView is not bound to a PEFT model yet (asked for {name!r})")
        return getattr(peft, name)


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
    the base weights; the adapters add their own small matrices), frozen for inference."""
    from peft import PeftModel

    names = list(adapters)
    if not names:
        raise ValueError("no adapters to attach")
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name, is_trainable=False)
    peft.eval()
    return peft
