"""Stage settings are defined once, in the core; the Dagster run configs derive from them."""

import dagster as dg
import pytest

from assets.finetune import SFTConfig
from assets.rl_policy import RLConfig
from refine_af_pipeline.training.rl import RLSettings
from refine_af_pipeline.training.sft import SFTSettings

pytestmark = pytest.mark.unit

DERIVED = [(RLConfig, RLSettings), (SFTConfig, SFTSettings)]


def _asset_configs() -> list[type]:
    import assets
    import refine_af_pipeline.definitions  # noqa: F401  (imports every asset module)

    modules = [m for name, m in sorted(vars(assets).items()) if not name.startswith("_") and hasattr(m, "__file__")]
    return sorted(
        {
            obj
            for m in modules
            for obj in vars(m).values()
            if isinstance(obj, type) and issubclass(obj, dg.Config) and obj.__module__.startswith("assets.")
        },
        key=lambda c: c.__name__,
    )


def test_every_run_config_is_a_core_settings_class_and_adds_nothing():
    configs = _asset_configs()
    assert len(configs) >= 10, [c.__name__ for c in configs]
    for config in configs:
        [core] = [b for b in config.__bases__ if b is not dg.Config]
        assert core.__module__.startswith("refine_af_pipeline.") and "dagster" not in core.__module__, config
        assert list(config.model_fields) == list(core.model_fields), config  # no field of its own
        undocumented = [n for n, f in core.model_fields.items() if not f.description]
        assert not undocumented, (core.__name__, undocumented)


def test_the_sampling_settings_are_shared():
    from refine_af_pipeline.settings_types import SamplingSettings

    sampling = [c.__name__ for c in _asset_configs() if issubclass(c, SamplingSettings)]
    assert {"BootstrapConfig", "RewardScoresConfig", "InstancePairsConfig", "HeldoutComparisonConfig"} <= set(sampling)


@pytest.mark.parametrize("config, settings", DERIVED)
def test_the_run_config_has_the_settings_fields_defaults_and_descriptions(config, settings):
    assert issubclass(config, dg.Config) and issubclass(config, settings) and config.__module__.startswith("assets.")
    assert list(config.model_fields) == list(settings.model_fields)
    for name, field in settings.model_fields.items():
        derived = config.model_fields[name]
        assert field.description, f"{settings.__name__}.{name} has no description"
        assert (derived.default, derived.description, derived.annotation) == (
            field.default,
            field.description,
            field.annotation,
        )
    assert config().model_dump() == settings().model_dump()


@pytest.mark.parametrize("config, settings", DERIVED)
def test_the_launchpad_schema_shows_each_description_and_default(config, settings):
    from dagster._config.pythonic_config import infer_schema_from_config_class

    fields = infer_schema_from_config_class(config).config_type.fields
    for name, field in settings.model_fields.items():
        assert fields[name].description == field.description
        assert fields[name].default_value == field.default


def test_closed_choices_and_cross_field_rules_are_refused_when_the_settings_are_made():
    with pytest.raises(ValueError, match="Input should be 'grpo' or 'rloo'"):
        RLConfig(algorithm="ppo")
    with pytest.raises(ValueError, match=r"train_batch_size \(5\) must divide prompts_per_step x group_size \(12\)"):
        RLConfig(prompts_per_step=3, train_batch_size=5)
    with pytest.raises(ValueError, match=r"train_batch_size \(3\) must divide batch_size \(4\)"):
        SFTConfig(train_batch_size=3)
    with pytest.raises(ValueError, match="extra"):
        RLSettings(max_step=3)  # a misspelt setting is not silently ignored


def test_a_run_config_reaches_the_settings():
    settings = RLConfig(max_steps=20, prompts_per_step=8, heldout_share=0.3)
    assert (settings.max_steps, settings.prompts_per_step, settings.heldout_share) == (20, 8, 0.3)
    assert settings.group_size == RLSettings().group_size
