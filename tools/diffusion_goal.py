"""The D-CMVAE goal table from a run's eval_diffusion.json: CMVAE vs D-CMVAE per metric, unconditional and
conditional, with the goal's two tests (classifier-feature distance at least 25% lower; coherence within 0.05).

    .venv/bin/python tools/diffusion_goal.py runs/demo --train-minutes 15.0 --out bench/results/dcmvae-goal.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cmvae_engine.engine.checkpoint import atomic_write_json

FD_DROP, COHERENCE_TOL = 0.25, 0.05


def goal_table(result: dict) -> dict:
    rows, ok = [], True
    for kind in ("unconditional", "conditional"):
        a, b = result[kind]["cmvae"], result[kind]["dcmvae"]
        drop = (a["classifier_fd"] - b["classifier_fd"]) / a["classifier_fd"]
        coh = b["coherence"] - a["coherence"]
        passed = {"classifier_fd_25pct_lower": drop >= FD_DROP, "coherence_within_0.05": abs(coh) <= COHERENCE_TOL}
        ok = ok and all(passed.values())
        rows.append({"samples": kind, "cmvae": {k: a[k] for k in ("classifier_fd", "coherence", "fid") if k in a},
                     "dcmvae": {k: b[k] for k in ("classifier_fd", "coherence", "fid") if k in b},
                     "classifier_fd_relative_drop": drop, "coherence_change": coh, "passed": passed})
    return {"rows": rows, "goal_met": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--train-minutes", type=float, required=True, help="wall-clock minutes the denoisers trained")
    p.add_argument("--note", default="")
    p.add_argument("--not-goal-setting", action="store_true",
                   help="the run differs from the goal's setting (say how in --note): the criteria are reported "
                        "for this run and goal_met is null")
    a = p.parse_args()
    run = Path(a.run_dir)
    result = json.loads((run / "eval_diffusion.json").read_text())
    table = goal_table(result)
    table.update(split=result["split"], sampler=result["sampler"], steps=result["steps"],
                 n_unconditional=result["n_unconditional"], n_conditional=result["n_conditional"],
                 denoiser=result["denoiser"], train_minutes=a.train_minutes,
                 train_steps=result["denoiser"]["steps_trained"],
                 load_average_now=[round(v, 2) for v in os.getloadavg()], run_info=result["run_info"],
                 classifiers=result["classifiers"], note=a.note)
    if a.not_goal_setting:
        table["criteria_met_on_this_run"], table["goal_met"] = table["goal_met"], None
    atomic_write_json(a.out, table)
    print(json.dumps(table["rows"], indent=1))
    met = table.get("criteria_met_on_this_run", table["goal_met"])
    print(("criteria met" if met else "criteria NOT met") + (" (not the goal's setting)" if a.not_goal_setting else ""))


if __name__ == "__main__":
    main()
