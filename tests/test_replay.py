"""Determinism: stored histories of real runs (cold, refused, warm with syncs and a cutover,
warm cancelled) must replay against today's MigrationWorkflow. A change that breaks a running
migration fails here; put it behind ``workflow.patched()``. Recorded by
scripts/record_histories.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.migration import MigrationWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_were_recorded():
    names = {p.stem for p in HISTORIES}
    assert {"replay-cold", "replay-refused", "replay-warm", "replay-cancel"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[MigrationWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
