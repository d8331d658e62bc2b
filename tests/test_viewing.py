"""What people see first in the MLflow UI: experiment tags, the saved comparison view, the printed hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli
from regsweep.experiment import (COMPARE_VIEW_ID, COMPARE_VIEW_TAG, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG,
                                 store_uri_for_ui, use_experiment, viewing_hint)

TRAIN = ["--epochs", "1", "--max-train-samples", "256", "--max-eval-samples", "128", "--batch-size", "32",
         "--compile", "false", "--log-model", "false", "--log-images", "false", "--quiet"]


def saved_view_state(tags: dict[str, str]) -> dict:
    envelope = json.loads(tags[COMPARE_VIEW_TAG])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])


def test_train_tags_the_experiment_it_used_and_prints_where_to_look(tracking_uri, tmp_path):
    result = CliRunner().invoke(cli, ["train", *TRAIN])
    assert result.exit_code == 0, result.output
    (run,) = MlflowClient().search_runs(["0"])  # no --experiment-name: MLflow's Default experiment
    tags = MlflowClient().get_experiment("0").tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    state = saved_view_state(tags)
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`best_val_acc`", False)
    assert {"params.`l1`", "params.`l2`", "metrics.`best_val_acc`"} <= set(state["selectedColumns"])
    assert [s["name"] for s in state["compareRunSections"][:3]] == ["val", "train", "test"]

    command, url = result.output.strip().splitlines()[-2:]
    assert command == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}    # then open:"
    assert url == f"http://127.0.0.1:5000/#/experiments/0/runs/{run.info.run_id}?workflowType=machine_learning"


def test_an_experiment_gets_its_kind_and_view_once_and_a_users_edit_stays(tracking_uri):
    experiment_id = use_experiment("fresh")
    client = MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert viewing_hint(experiment_id).endswith(
        f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={COMPARE_VIEW_ID}")

    edited = json.dumps({"name": "mine", "createdAt": 1, "state": "{}"})
    client.set_experiment_tag(experiment_id, COMPARE_VIEW_TAG, edited)
    assert use_experiment("fresh") == experiment_id
    assert client.get_experiment(experiment_id).tags[COMPARE_VIEW_TAG] == edited


def test_a_url_names_the_view_only_where_the_experiment_holds_it(tracking_uri):
    # An experiment regsweep never touched: a view key the UI cannot find would show an error instead.
    experiment_id = MlflowClient().create_experiment("elsewhere")
    assert viewing_hint(experiment_id).splitlines()[-1] == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning")


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", f"sqlite:///{Path('mlflow.db').resolve()}"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("mlruns", str(Path("mlruns").resolve())),
    ("file:///abs/mlruns", "file:///abs/mlruns"),
    ("postgresql://me:secret@db:5432/mlflow", "postgresql://me:***@db:5432/mlflow"),
])
def test_the_printed_store_works_from_any_directory_and_hides_passwords(uri, expected):
    assert store_uri_for_ui(uri) == expected
