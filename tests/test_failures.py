"""What the user sees when things go wrong at run time: bad run config, a model or device that is not
there, model output that does not parse, a flaky backend, a DuckDB file held by another process."""

import subprocess
import sys
import time

import dagster as dg
import duckdb
import pytest
import torch
from pipeline_helpers import materialize

import refine_af_pipeline.llm.retry as retry
from refine_af_pipeline.definitions import all_assets, all_checks, default_resources
from refine_af_pipeline.llm.backend import Generation
from refine_af_pipeline.llm.transformers_backend import TransformersModel
from resources import DatabaseLocked, LanguageModelResource
from resources import language_model as language_model_module

pytestmark = pytest.mark.graph

BOOTSTRAP = ["raw_instructions", "deduplicated_instructions", "instruction_pool"]  # one step writes the three


def _materialize(data_dir, selection, ops=None, **model_config):
    resources = default_resources(data_dir)
    resources["language_model"] = LanguageModelResource(**{"device": "cpu", **model_config})
    return dg.materialize(
        [*all_assets, *all_checks],
        resources=resources,
        selection=selection,
        run_config=dg.RunConfig(ops={k: {"config": v} for k, v in (ops or {}).items()}),
    )


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if any step reads model weights or a tokenizer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(language_model_module, "load_causal_lm", forbidden)
    monkeypatch.setattr(language_model_module, "load_tokenizer", forbidden)


@pytest.fixture
def seeded_dir(tmp_path):
    data_dir = tmp_path / "data"
    assert materialize(data_dir, "unused", {}, selection=["seed_pool"]).success
    return data_dir


def _tables(data_dir) -> set[str]:
    with duckdb.connect(str(data_dir / "refine_af.duckdb"), read_only=True) as conn:
        return {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_prompts": 0}, r"num_prompts\n  Input should be greater than 0"),
        ({"num_prompts": -4}, r"num_prompts\n  Input should be greater than 0"),
        ({"max_new_tokens": 0}, r"max_new_tokens\n  Input should be greater than 0"),
        ({"classification_prompts": -1}, r"classification_prompts\n  Input should be greater than or equal to 0"),
        (
            {"num_prompts": 2, "classification_prompts": 3},
            r"classification_prompts \(3\) cannot exceed num_prompts \(2\)",
        ),
        ({"temperature": 0.0}, r"temperature\n  Input should be greater than 0"),
        ({"target_pool_size": 0}, r"target_pool_size\n  Input should be greater than 0"),
    ],
)
def test_bad_sizes_fail_before_any_model_is_loaded(seeded_dir, tiny_model_dir, no_model_load, config, message):
    with pytest.raises(Exception) as info:
        _materialize(seeded_dir, BOOTSTRAP, {"bootstrap_instructions": config}, model=str(tiny_model_dir))
    assert info.match(message)
    assert "raw_instructions" not in _tables(seeded_dir)


@pytest.mark.parametrize(
    "model_config, message",
    [
        ({"device": "cuda"}, "device 'cuda' was requested but this machine has no CUDA device"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        (
            {"model": "nobody/no-such-model"},
            "model 'nobody/no-such-model' is neither a local directory nor in the "
            "local Hugging Face cache, and downloads are off",
        ),
        ({"model": "/no/such/model/dir"}, "model directory /no/such/model/dir does not exist"),
    ],
)
def test_unusable_model_or_device_fails_before_any_model_is_loaded(
    seeded_dir, tiny_model_dir, no_model_load, model_config, message
):
    if model_config.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    started = time.monotonic()
    with pytest.raises(dg.DagsterResourceFunctionError) as info:
        _materialize(seeded_dir, BOOTSTRAP, **{"model": str(tiny_model_dir), **model_config})
    assert message in str(_root_cause(info.value))
    assert time.monotonic() - started < 60
    assert "raw_instructions" not in _tables(seeded_dir)


def test_zero_batch_size_is_refused():
    with pytest.raises(Exception, match=r"batch_size\n  Input should be greater than 0"):
        LanguageModelResource(batch_size=0)


def test_model_output_that_does_not_parse_is_stored_with_its_status(seeded_dir, tiny_model_dir, monkeypatch):
    junk = ["", "   \n\n", "!!! ??? ###", "\x00\x01 ∆∆∆ " * 20, "10. 11. 12.", "Sure! Here are some ideas."]

    def junk_generate(self, prompts, *args, **kwargs):
        return [Generation(junk[k % len(junk)], 5, True) for k in range(len(prompts))]

    monkeypatch.setattr(TransformersModel, "generate", junk_generate)
    result = materialize(
        seeded_dir,
        str(tiny_model_dir),
        {"bootstrap_instructions": {"num_prompts": 6, "classification_prompts": 0}},
        selection=BOOTSTRAP,
    )
    assert result.success
    with duckdb.connect(str(seeded_dir / "refine_af.duckdb"), read_only=True) as conn:
        raw = conn.execute("SELECT raw_response, parse_status FROM raw_instructions").pl()
        dedup = conn.execute("SELECT decision, reason FROM deduplicated_instructions").pl()
    assert sorted(raw["raw_response"]) == sorted(junk)  # every response kept, none dropped silently
    assert set(raw["parse_status"]) == {"empty", "unparseable"}
    assert set(dedup["decision"]) == {"rejected"} and set(dedup["reason"]) == {"unparseable_response"}
    [metadata] = [
        m.metadata
        for m in result.asset_materializations_for_node("bootstrap_instructions")
        if m.asset_key == dg.AssetKey("raw_instructions")
    ]
    assert metadata["unparseable_responses"].value == 6 and metadata["parsed_instructions"].value == 0


def test_a_flaky_backend_is_retried_inside_the_step(seeded_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(retry, "DEFAULT_BACKOFF", retry.Backoff(attempts=3, first_delay_s=0.01))
    real_load, failures = LanguageModelResource.load_variants, []

    def load_flaky(self, adapters):
        models, tokenizer, source, device = real_load(self, adapters)
        [model] = set(models.values())  # the base model only
        real_forward = model.forward

        def flaky_forward(*args, **kwargs):
            if len(failures) < 2:
                failures.append(1)
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")
            return real_forward(*args, **kwargs)

        model.forward = flaky_forward
        return models, tokenizer, source, device

    monkeypatch.setattr(LanguageModelResource, "load_variants", load_flaky)
    result = materialize(
        seeded_dir,
        str(tiny_model_dir),
        {"bootstrap_instructions": {"num_prompts": 4, "classification_prompts": 1, "max_new_tokens": 16}},
        selection=BOOTSTRAP,
        batch_size=2,
    )
    assert result.success and len(failures) == 2
    with duckdb.connect(str(seeded_dir / "refine_af.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(DISTINCT prompt_index) FROM raw_instructions").fetchone()[0] == 4


def test_a_backend_that_keeps_failing_fails_the_step_after_the_bound(seeded_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(retry, "DEFAULT_BACKOFF", retry.Backoff(attempts=3, first_delay_s=0.01))
    real_load = LanguageModelResource.load_variants

    def load_broken(self, adapters):
        models, tokenizer, source, device = real_load(self, adapters)

        def broken(*args, **kwargs):
            raise OSError("Input/output error (simulated)")

        for model in models.values():
            model.forward = broken
        return models, tokenizer, source, device

    monkeypatch.setattr(LanguageModelResource, "load_variants", load_broken)
    with pytest.raises(retry.RetriesExhausted, match=r"prefill of 4 prompts failed 3 times; the last error: OSError"):
        materialize(
            seeded_dir,
            str(tiny_model_dir),
            {"bootstrap_instructions": {"num_prompts": 4, "classification_prompts": 1, "max_new_tokens": 16}},
            selection=BOOTSTRAP,
            batch_size=4,
        )


def test_a_locked_database_fails_the_step_within_seconds_naming_the_file(seeded_dir):
    db = seeded_dir / "refine_af.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        with pytest.raises(DatabaseLocked) as info:
            materialize(seeded_dir, "unused", {}, selection=["seed_pool"])
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert f"DuckDB file {db} is locked by another process (waited 10 s)" in str(info.value)
    assert "Only one run may write it at a time" in str(info.value)
    assert elapsed < 30  # the 10 s wait plus the run's own start-up, not DuckDB's own minutes


class _RecordingComponent:
    def __init__(self, name):
        self.name, self.version, self.seen = name, f"fake-{name}", []

    def score(self, instructions, inputs, outputs):
        self.seen.extend(outputs)
        return [0.5] * len(outputs)


def test_instances_that_do_not_parse_are_kept_with_their_status_and_never_scored():
    from refine_af_pipeline.feedback.gates import DEFAULT_GATE_REWARD
    from refine_af_pipeline.feedback.scores import COMPONENTS, FeedbackScorer
    from refine_af_pipeline.instructions.instances import filter_reason

    components = [_RecordingComponent(name) for name in COMPONENTS]
    scorer = FeedbackScorer(components=components)
    generations = [
        "",
        "Input: only an input",
        "Output:",
        "Input: x\nOutput: x",
        "\x00\x01 ∆∆∆",
        "Output: " + "la la la " * 30,
        "Input: a question\nOutput: a real answer",
    ]
    scored = scorer.score_texts(["Answer it"] * len(generations), generations)
    statuses = [(s.parse_status, s.gate_reason) for s in scored]
    assert statuses == [
        ("missing_output", "missing_output"),
        ("missing_output", "missing_output"),
        ("empty_output", "empty_output"),
        ("ok", "output_copies_input"),
        ("missing_output", "missing_output"),
        ("ok", "degenerate_repetition"),
        ("ok", None),
    ]
    assert [s.reward for s in scored[:6]] == [DEFAULT_GATE_REWARD] * 6
    assert all(c.seen == ["a real answer"] for c in components)  # judges see only the parseable one
    rows = [dict(instruction="Answer it", input=s.input, output=s.output, gate_reason=s.gate_reason) for s in scored]
    assert filter_reason(rows)[:6] == [g for _, g in statuses[:6]] and filter_reason(rows)[6] is None


def _stage_config_classes() -> list[type]:
    import assets

    modules = [m for name, m in sorted(vars(assets).items()) if not name.startswith("_") and hasattr(m, "__file__")]
    found = {
        obj
        for m in modules
        for obj in vars(m).values()
        if isinstance(obj, type) and issubclass(obj, dg.Config) and obj.__module__.startswith("assets.")
    }
    return sorted(found, key=lambda c: c.__name__)


def test_every_stage_refuses_negative_sizes():
    import refine_af_pipeline.definitions  # noqa: F401  (imports every asset module)

    classes = _stage_config_classes()
    assert {"BootstrapConfig", "InstancePairsConfig", "SFTConfig", "EvaluationConfig"} <= {c.__name__ for c in classes}
    unconstrained, checked = [], 0
    for cls in classes:
        for name, field in cls.model_fields.items():
            if field.annotation in (int, float) and name != "seed" or (field.metadata and name != "seed"):
                checked += 1
                try:
                    cls(**{name: -1})
                    unconstrained.append(f"{cls.__name__}.{name}")
                except Exception as exc:
                    assert name in str(exc), exc
    assert checked >= 30 and not unconstrained, f"these accept -1: {unconstrained}"
