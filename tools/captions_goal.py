"""The image + text goal record from a finished polydigits-captions run: `prune`'s chosen cluster count and test
scores (prune.json), the caption-naming rate of captions generated from images (eval.json) and the training's
wall time, with the goal's four tests (the class count recovered, test NMI >= 0.85, naming rate above one half,
training within 15 minutes).

    .venv/bin/python tools/captions_goal.py runs/pc --train-wall-s 512 --out bench/results/captions-goal.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cmvae_engine.cmvae.data.polydigits import N_CLASSES
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.report import read_metrics
from cmvae_engine.engine.run_info import run_info

NMI_MIN, NAMING_MIN, WALL_MAX_S = 0.85, 0.5, 15 * 60


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise SystemExit(f"{path}: not found; run `cmvae-engine prune` and `cmvae-engine eval` on the run "
                         "first") from err


def goal_record(run: Path, train_wall_s: float) -> dict:
    prune, ev = read_json(run / "prune.json"), read_json(run / "eval.json")
    if ev.get("split") != "test" or "caption_naming" not in ev:
        raise SystemExit(f"{run / 'eval.json'}: needs the test split's caption_naming; run `cmvae-engine eval "
                         f"{run}` (default split test) on a data set whose class names are caption words")
    epochs = read_metrics(run / "metrics.jsonl")
    if not epochs:
        raise SystemExit(f"{run / 'metrics.jsonl'}: no epoch rows; train the run to the end of an epoch first")
    naming = ev["caption_naming"]
    test = prune["test"]
    passed = {"class_count_recovered": prune["chosen_k"] == N_CLASSES, "test_nmi_at_least_0.85": test["nmi"] >= NMI_MIN,
              "naming_rate_above_half": naming["rate"] > NAMING_MIN, "train_within_15_min": train_wall_s <= WALL_MAX_S}
    return {
        "benchmark": "captions-goal",
        "run": str(run),
        "train": {"command": read_json(run / "run_info.json")["sessions"][0]["command"], "wall_s": train_wall_s,
                  "steps": epochs[-1]["step"], "epochs": epochs[-1]["epoch"],
                  "loop_elapsed_s": epochs[-1]["elapsed_s"]},
        "prune": {"split": prune["split"], "initial_k": prune["initial_k"], "chosen_k": prune["chosen_k"],
                  "test": {k: test[k] for k in ("nmi", "ari", "acc", "k", "n")}},
        "caption_naming": {k: naming[k] for k in ("rate", "pairs", "n", "rule", "examples")},
        "eval_split": ev["split"],
        "conditional_coherence": ev.get("coherence", {}).get("conditional"),
        "passed": passed,
        "goal_met": all(passed.values()),
        "load_average_now": [round(v, 2) for v in os.getloadavg()],
        "collected": run_info("cpu"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--train-wall-s", type=float, required=True, help="wall-clock seconds of the `train` command")
    p.add_argument("--out", required=True)
    p.add_argument("--note", default="", help="how the machine was used while the run trained")
    a = p.parse_args()
    record = goal_record(Path(a.run_dir), a.train_wall_s)
    record["note"] = a.note
    atomic_write_json(a.out, record)
    print(json.dumps({k: record[k] for k in ("prune", "passed", "goal_met")}, indent=1))
    print(f"caption naming rate {record['caption_naming']['rate']:.3f}")


if __name__ == "__main__":
    main()
