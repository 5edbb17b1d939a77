"""Learning-rate schedules (medreg.train.schedules) and the CSV log (medreg.train.logging)."""

import csv
import math

import pytest

from medreg.core import InputError
from medreg.train.logging import CsvLog
from medreg.train.schedules import schedule_from_config, warmup_factor


def test_cosine_step_and_warmup():
    cos = schedule_from_config("cosine", total_steps=100)
    assert cos.factor(0) == pytest.approx(1.0)
    assert cos.factor(50) == pytest.approx(0.5, abs=0.02)
    assert cos.factor(99) < 0.01
    step = schedule_from_config({"name": "step", "step_size": 10, "gamma": 0.5}, total_steps=100)
    assert [step.factor(s) for s in (0, 9, 10, 25)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    assert [warmup_factor(s, 4) for s in (0, 1, 3, 4, 50)] == pytest.approx([0.25, 0.5, 1.0, 1.0, 1.0])


def test_plateau_reduces_after_patience_and_keeps_state():
    sched = schedule_from_config({"name": "plateau", "factor": 0.5, "patience": 1}, total_steps=10)
    sched.observe(1.0, improved=True)
    sched.observe(1.0, improved=False)
    assert sched.factor(0) == 1.0  # one bad validation is within patience
    sched.observe(1.0, improved=False)
    assert sched.factor(0) == 0.5
    again = schedule_from_config({"name": "plateau", "factor": 0.5, "patience": 1}, total_steps=10)
    again.load_state_dict(sched.state_dict())
    assert again.factor(0) == 0.5


def test_unknown_schedule_or_option_is_an_error():
    with pytest.raises(InputError, match="unknown schedule"):
        schedule_from_config("linear", total_steps=10)
    with pytest.raises(InputError, match="no option"):
        schedule_from_config({"name": "cosine", "gamma": 0.1}, total_steps=10)


def test_csv_log_adds_columns_and_rewinds_on_resume(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.4, "dice": 0.7})  # a new column: header rewritten
    log.write({"step": 3, "loss": 0.3})
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[0]["dice"] == ""
    assert math.isclose(float(rows[1]["dice"]), 0.7)
    resumed = CsvLog(path, keep_until=2)  # a run resumed from step 2 drops later rows
    resumed.write({"step": 3, "loss": 0.35})
    rows = list(csv.DictReader(path.open()))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and math.isclose(float(rows[2]["loss"]), 0.35)
