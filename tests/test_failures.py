"""A trial that fails (an exception in the user's model, NaN loss) is recorded with its reason, in
Optuna and MLflow, and the study goes on."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from autocompress.api import search

pytestmark = pytest.mark.slow  # end-to-end searches

MODELS = Path(__file__).with_name("flaky_models.py")


@pytest.mark.parametrize("name,reason", [("raising", "RuntimeError: user model refuses to train"),
                                         ("nan", "NonFiniteLoss: fine-tune loss became nan")])
def test_failed_trials_keep_their_reason_and_the_study_goes_on(tmp_path, name, reason):
    outcome = search("2x", model=f"{MODELS}:{name}", data="digits", out=str(tmp_path), study="f", trials=2,
                     epochs=1, baseline_epochs=0, max_batches=2, progress=False, seed=0, warm_start=False,
                     final_top=0)
    assert outcome.best is None and len(outcome.study.trials) == 2  # both trials ran, neither stopped the study
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for t in outcome.study.trials:
        assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["fail_reason"].startswith(reason)
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["fail_reason"].startswith(reason)


def test_a_failed_trial_is_one_line_of_output_not_optunas_parameter_dump(tmp_path, capfd):
    search("2x", model=f"{MODELS}:nan", data="digits", out=str(tmp_path), study="f", trials=2, epochs=1,
           baseline_epochs=0, max_batches=2, progress=False, seed=0, warm_start=False, final_top=0)
    out = capfd.readouterr()
    text = out.out + out.err
    assert text.count("NonFiniteLoss: fine-tune loss became nan") == 2  # each trial's line gives its reason
    assert "failed with parameters" not in text and "failed with value None" not in text
    assert "Traceback" not in text
