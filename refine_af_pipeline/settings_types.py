"""Field types shared by the stages' settings (pydantic, no Dagster).

Each stage's settings are one pydantic model in the core module of its stage (BootstrapSettings,
RLSettings, ...): every field with its default, constraint and description. The asset's run
config derives from it (`class BootstrapConfig(dg.Config, BootstrapSettings)`), so it has the
same fields, the launchpad shows the descriptions, and a zero or negative size fails with
pydantic's message naming the field before the asset reads a table or loads a model."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]  # for "0 = all" limits and counts that may be none
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, le=1)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]

# The one definition of each sampling default. SamplingSettings (every generation stage's settings
# derive from it), RL's rollouts and the backends' SamplingParams take them from here, so the
# policy's rollouts, the reward's instances and the data are sampled alike unless a config says not.
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95


class GenerationBatchSettings(BaseModel):
    """The generation batch of a stage that calls generate; the language model resource's
    batch_size is the device-wide default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation_batch_size: NonNegativeInt = Field(
        0, description="prompts per generate call in this stage (0 = the model resource's batch_size)"
    )


class SamplingSettings(GenerationBatchSettings):
    """How a generation stage samples; the instance stages, the reward scores and the held-out check
    share these defaults, so RL's reward, the check and the data see the policy sampled alike."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: PositiveInt = Field(DEFAULT_MAX_NEW_TOKENS, description="tokens per generation at most")
    temperature: PositiveFloat = Field(DEFAULT_TEMPERATURE, description="sampling temperature")
    top_p: Probability = Field(
        DEFAULT_TOP_P, description="nucleus sampling: the smallest token set with this much probability"
    )
    seed: int = Field(0, description="seed of the sampling (and of the stage's random choices)")

    def sampling_params(self):
        from .llm.backend import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, do_sample=True)
