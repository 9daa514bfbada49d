"""The Dagster UI for real: dagster-webserver and dagster-daemon as processes, the code location
loaded from workspace.yaml, the lineage read back through GraphQL, and the whole graph materialized
through the run queue on the tiny model."""

import time

import duckdb
import pytest
from dagster_graphql import DagsterGraphQLClient
from dagster_services import DagsterServices
from pipeline_helpers import smallest_run_config

from refine_af_pipeline.definitions import defs

pytestmark = pytest.mark.live

LOCATION = "refine_af_pipeline"  # workspace.yaml's location_name
WORKSPACE = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}"""
ASSET_NODES = "query { assetNodes { assetKey { path } dependencyKeys { path } groupName } }"
LATEST_METADATA = """
query {
  assetNodes {
    assetKey { path }
    assetMaterializations(limit: 1) { runId metadataEntries { label } }
  }
}"""
RUN_FAILURES = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message stepKey }
        ... on ExecutionStepFailureEvent { error { message stack } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}"""


def expected_lineage() -> dict[str, set[str]]:
    """Every asset and its upstream assets, from the Definitions (whatever assets exist now)."""
    graph = defs.resolve_asset_graph()
    return {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()
    }


def job_run_config() -> dict:
    """The smallest sizes, for the ops (assets and checks) the job has. Steps run in the run
    worker's process: on 2 cores each step process spends ~40 s importing torch and transformers
    (the run took 13.5 min that way, 2 in one process); queue, launcher and run worker are the
    ones the UI uses either way."""
    nodes = set(defs.resolve_job_def("refine_af_job").graph.node_names())
    return {
        "ops": {op: {"config": cfg} for op, cfg in smallest_run_config().items() if op in nodes},
        "execution": {"config": {"in_process": {}}},
    }


def wait_for_location(services: DagsterServices, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        workspace = services.graphql(WORKSPACE)["workspaceOrError"]
        assert workspace["__typename"] == "Workspace", workspace
        [entry] = [e for e in workspace["locationEntries"] if e["name"] == LOCATION]
        loaded = entry["locationOrLoadError"]
        if loaded and loaded["__typename"] == "PythonError":
            raise AssertionError(f"code location failed to load: {loaded['message']}\n{''.join(loaded['stack'])}")
        if entry["loadStatus"] == "LOADED" and loaded:
            return loaded
        if time.monotonic() > deadline:
            raise AssertionError(f"code location not loaded after {timeout_s} s: {entry}\n{services.log_tail()}")
        time.sleep(2)


def run_failure_report(services: DagsterServices, run_id: str) -> str:
    events = services.graphql(RUN_FAILURES, {"runId": run_id})["logsForRun"].get("events", [])
    failures = [e for e in events if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")]
    lines = [
        f"{e.get('stepKey')}: {e['message']}\n{e['error']['message']}\n{''.join(e['error'].get('stack') or [])[-3000:]}"
        for e in failures
    ]
    return "\n".join(lines) or "\n".join(e.get("message", "") for e in events[-30:])


@pytest.fixture
def services(tiny_model_dir, tmp_path):
    services = DagsterServices(
        tmp_path / "dagster_home",
        {
            "REFINE_AF_DATA_DIR": str(tmp_path / "data"),
            "REFINE_AF_MODEL": str(tiny_model_dir),
            "REFINE_AF_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        },
    )
    services.start()
    try:
        yield services
    finally:
        services.stop()


def test_ui_shows_the_lineage_and_runs_the_whole_graph(services, tmp_path):
    info = services.wait_until_serving(timeout_s=300)
    assert "dagster_webserver_version" in info
    location = wait_for_location(services, timeout_s=300)
    assert [r["name"] for r in location["repositories"]] == ["__repository__"]

    lineage = {
        "/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]}
        for n in services.graphql(ASSET_NODES)["assetNodes"]
    }
    assert lineage == expected_lineage()

    client = DagsterGraphQLClient("127.0.0.1", port_number=services.port, timeout=60)
    run_id = client.submit_job_execution(
        "refine_af_job",
        repository_location_name=LOCATION,
        repository_name="__repository__",
        run_config=job_run_config(),
    )
    deadline = time.monotonic() + 1500
    status = None
    while time.monotonic() < deadline:
        status = client.get_run_status(run_id).value
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(5)
    assert status == "SUCCESS", (
        f"run {run_id} ended {status}:\n{run_failure_report(services, run_id)}\n{services.log_tail()}"
    )

    # Every asset's table was written, and its materialization carries the metadata the UI shows.
    with duckdb.connect(str(tmp_path / "data" / "refine_af.duckdb"), read_only=True) as conn:
        for asset in lineage:
            assert conn.execute(f'SELECT count(*) FROM "{asset}"').fetchone()[0] > 0, asset
    for node in services.graphql(LATEST_METADATA)["assetNodes"]:
        [latest] = node["assetMaterializations"]
        assert latest["runId"] == run_id
        labels = {e["label"] for e in latest["metadataEntries"]}
        assert {"dagster/row_count", "dagster/column_schema", "preview"} <= labels, (node["assetKey"], labels)
