"""The model class behind the OpenAssistant oasst-rm pythia reward models (the paper's preference
judge, e.g. OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5).

Their config.json says model_type "gpt_neox_reward_model", which transformers does not know: the
checkpoints were saved by Open-Assistant's training code. The layout is a GPT-NeoX body
(`gpt_neox.*`) and one linear head (`out_proj`) on the last (or mean) hidden state. This module
re-declares that layout so AutoModelForSequenceClassification loads the checkpoint with no
trust_remote_code and no extra package. It imports torch and transformers: import it lazily.
"""

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXPreTrainedModel


class OasstRewardConfig(GPTNeoXConfig):
    model_type = "gpt_neox_reward_model"
    pooling: str = "last"  # "last": the last attended token; "mean": mean over attended tokens


class OasstRewardModel(GPTNeoXPreTrainedModel):
    config_class = OasstRewardConfig
    config: OasstRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = GPTNeoXModel(config)
        self.out_proj = torch.nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> SequenceClassifierOutput:
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if self.config.pooling == "mean":
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        elif self.config.pooling == "last":
            # Index of the last attended position; right or left padding alike.
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            raise ValueError(f"unknown pooling '{self.config.pooling}' in the reward model config")
        return SequenceClassifierOutput(logits=self.out_proj(pooled))


def register_oasst_reward_model() -> None:
    """Teach the Auto classes the "gpt_neox_reward_model" type (idempotent)."""
    AutoConfig.register(OasstRewardConfig.model_type, OasstRewardConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(OasstRewardConfig, OasstRewardModel, exist_ok=True)
