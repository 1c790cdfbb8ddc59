"""tools/captions_goal.py: the goal's tests read from a run's files, each threshold on its own side."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("captions_goal", Path(__file__).parent.parent / "tools/captions_goal.py")
captions_goal = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(captions_goal)


def write_run(run: Path, *, chosen_k=10, nmi=0.9, rate=0.7, split="test") -> Path:
    run.mkdir()
    (run / "prune.json").write_text(json.dumps({"split": "valid", "initial_k": 40, "chosen_k": chosen_k,
                                                "test": {"nmi": nmi, "ari": 0.9, "acc": 0.9, "k": chosen_k,
                                                         "n": 20}}))
    (run / "eval.json").write_text(json.dumps({"split": split, "coherence": {"conditional": {"average": 0.5}},
                                               "caption_naming": {"rate": rate, "pairs": {"m0->m2": rate}, "n": 20,
                                                                  "rule": "r", "examples": []}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e, "step": 10 * e, "elapsed_s": 5.0 * e})
                                                 for e in (1, 2)) + "\n")
    (run / "run_info.json").write_text(json.dumps({"sessions": [{"command": "cmvae-engine train x"}]}))
    return run


def test_all_tests_pass_and_record_the_last_epoch(tmp_path):
    rec = captions_goal.goal_record(write_run(tmp_path / "r"), train_wall_s=600)
    assert rec["goal_met"] is True
    assert rec["train"]["steps"] == 20 and rec["train"]["epochs"] == 2


@pytest.mark.parametrize(("kwargs", "wall", "failed"), [
    ({"chosen_k": 9}, 600, "class_count_recovered"),
    ({"nmi": 0.849}, 600, "test_nmi_at_least_0.85"),
    ({"rate": 0.5}, 600, "naming_rate_above_half"),
    ({}, 901, "train_within_15_min"),
])
def test_each_threshold_fails_alone(tmp_path, kwargs, wall, failed):
    rec = captions_goal.goal_record(write_run(tmp_path / "r", **kwargs), train_wall_s=wall)
    assert rec["goal_met"] is False
    assert [k for k, ok in rec["passed"].items() if not ok] == [failed]


def test_eval_on_another_split_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="test split"):
        captions_goal.goal_record(write_run(tmp_path / "r", split="valid"), train_wall_s=600)


def test_missing_prune_names_the_file(tmp_path):
    run = write_run(tmp_path / "r")
    (run / "prune.json").unlink()
    with pytest.raises(SystemExit, match="prune.json: not found"):
        captions_goal.goal_record(run, train_wall_s=600)


def test_run_without_a_finished_epoch_is_refused(tmp_path):
    run = write_run(tmp_path / "r")
    (run / "metrics.jsonl").write_text('{"epoch": 1, "st')  # cut by a kill mid-write
    with pytest.raises(SystemExit, match="metrics.jsonl: no epoch rows"):
        captions_goal.goal_record(run, train_wall_s=600)
