"""Scale benchmark (issue 6, target 4): a simulation with 100 virtual sites against the same
simulation with 10, 10 sites sampled per round in both, side by side in one run.

The 1,000 PubMedQA records (``../shared/data/pubmedqa``) are split IID into 100 or 10 sites
(``[partition]``); everything else is the same: ``--rounds`` rounds, 2 DP steps of batch 4 per
sampled site, ``data.max-length = 128``, a bf16 base, ``simulation.client-cpus = 1`` (one worker
per core). Each ``fedllm simulate`` runs as its own process; its peak memory is the largest sum of
the RSS of that process and all its descendants (Ray, the workers), sampled every 0.5 s.

    python bench/bench_scale.py [--rounds 3] [--sites 100,10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBMEDQA = ROOT.parent / "shared" / "data" / "pubmedqa"
SAMPLED = 10
WORKERS = os.cpu_count() or 1  # client-cpus = 1: one simulation worker per core

RUN_TOML = """num-server-rounds = {rounds}
[model]
dtype = "bfloat16"
[data]
max-length = 128
[train]
local-steps = 2
batch-size = 4
learning-rate = 0.01
[strategy]
fraction-train = {fraction}
fraction-evaluate = {fraction}
min-train-sites = {sampled}
min-evaluate-sites = {sampled}
min-available-sites = {sites}
[privacy]
target-epsilon = 8.0
[simulation]
client-cpus = 1
"""


def _scenario(folder: Path, records: Path, sites: int, rounds: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "sites.toml").write_text(f'[partition]\ndata = "{records}"\nnum-sites = {sites}\nmethod = "iid"\nseed = 0\n'
                                       'eval-fraction = 0.2\nmax-eval-examples = 2\n')
    (folder / "run.toml").write_text(RUN_TOML.format(rounds=rounds, fraction=SAMPLED / sites, sampled=SAMPLED, sites=sites))
    return folder


def _run(scenario: Path, output: Path) -> dict:
    import psutil

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    start = time.perf_counter()
    with open(output.parent / f"{output.name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedllm.cli.main", "simulate", str(scenario), "--output", str(output)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True)))
            time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"fedllm simulate {scenario} failed (exit {proc.returncode}); see {output}.log")
    history = json.loads((output / "history.json").read_text())
    rounds = []
    for rnd in history["rounds"]:
        sites = (rnd.get("train") or {}).get("sites", {})
        if sites:
            training = sum(m["train-seconds"] for m in sites.values())
            # the workers' time in the round not spent in the sites' own training, per site
            overhead = (WORKERS * rnd["train-seconds"] - training) / len(sites)
            rounds.append({"round": rnd["round"], "sites": len(sites), "wall-s": round(rnd["train-seconds"], 1),
                           "site-training-s": round(training, 1), "site-overhead-s": round(overhead, 2)})
    return {"wall-s": round(wall, 1), "peak-mb": round(peak / 2**20), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", default="100,10", help="site counts to compare, the first against the second")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (PUBMEDQA / "ori_pqal.json").is_file():
        raise SystemExit(f"needs the PubMedQA copy in {PUBMEDQA} (../shared/data/pubmedqa beside the project)")
    from fedllm.data.pubmedqa import pubmedqa_site_records

    counts = [int(n) for n in args.sites.split(",")]
    report: dict = {"setup": f"PubMedQA split IID, {SAMPLED} sites sampled per round, {args.rounds} rounds, "
                             "2 DP steps x batch 4, max-length 128, bf16 base, 2 workers"}
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "pubmedqa.jsonl"
        rows = [r for site in pubmedqa_site_records(PUBMEDQA).values() for r in site]
        records.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for n in counts:
            report[f"{n}-sites"] = _run(_scenario(Path(tmp) / f"s{n}", records, n, args.rounds), Path(tmp) / f"run{n}")
    big, small = report[f"{counts[0]}-sites"], report[f"{counts[-1]}-sites"]
    report["ratios"] = {"peak-memory": round(big["peak-mb"] / small["peak-mb"], 3),
                        "wall-time": round(big["wall-s"] / small["wall-s"], 3)}
    # target 3: a virtual site's round beyond its training, in the warm rounds (every sampled site
    # seen before: the 10-site run from round 2 on)
    warm = [x["site-overhead-s"] for x in small["rounds"] if x["round"] >= 2]
    report["site-overhead-warm-s"] = round(statistics.median(warm), 2) if warm else None
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(report["setup"])
    for n in counts:
        r = report[f"{n}-sites"]
        rounds = " | ".join(f"round {x['round']}: {x['wall-s']} s ({x['site-training-s']} s training, "
                            f"{x['site-overhead-s']} s a site beyond it)" for x in r["rounds"])
        print(f"{n:>4} sites: wall {r['wall-s']} s, peak {r['peak-mb']} MB; {rounds}")
    print(f"ratios {counts[0]} / {counts[-1]} sites: peak memory {report['ratios']['peak-memory']}, "
          f"wall time {report['ratios']['wall-time']}")
    print(f"a site's round beyond its training, warm {counts[-1]}-site rounds (median): "
          f"{report['site-overhead-warm-s']} s")


if __name__ == "__main__":
    main()
