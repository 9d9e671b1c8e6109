#!/usr/bin/env python3
"""Super-resolve a BIDS cohort with Dask: one `ftddm bids … participant --participant-label L` per task.

One machine (a LocalCluster of N workers):
    python scripts/cohort/dask_cohort.py BIDS_DIR OUTPUT_DIR --workers 4 -- --model my.safetensors --samples 8
A cluster (a running `dask scheduler` with `dask worker`s, or dask-jobqueue's SLURMCluster, …):
    python scripts/cohort/dask_cohort.py BIDS_DIR OUTPUT_DIR --scheduler tcp://host:8786 -- --device cuda
Arguments after `--` go to `ftddm bids` unchanged. Each participant runs in its own process (the CLI), so a
failure or a crash stays with that participant; the group report is written once all have finished.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time


def ftddm_command() -> list[str]:
    """The `ftddm` CLI of this Python (workers share the environment of the client on one machine)."""
    return [sys.executable, "-m", "ftddm_core.cli"]


def run_participant(bids_dir: str, output_dir: str, label: str, extra: list[str]) -> dict:
    """One unit of work: the participant level for one label; returns its exit code, times and last lines."""
    start = time.time()
    done = subprocess.run([*ftddm_command(), "bids", bids_dir, output_dir, "participant",
                           "--participant-label", label, *extra], capture_output=True, text=True)
    return {"label": label, "returncode": done.returncode, "start": start, "end": time.time(),
            "log": (done.stdout + done.stderr).strip().splitlines()[-5:]}


def participants(bids_dir: str) -> list[str]:
    """Every participant of the dataset (pybids' view, as `ftddm bids` sees it)."""
    from bids import BIDSLayout

    return BIDSLayout(bids_dir, validate=False).get_subjects()


def run_cohort(bids_dir: str, output_dir: str, labels: list[str], extra: list[str], *, scheduler: str | None = None,
               workers: int = 2, group: bool = True) -> list[dict]:
    """Submit every participant to Dask (client.map), gather the results, then (group) run the group level once."""
    from dask.distributed import Client, LocalCluster

    # Threads are enough for workers that wait on a CLI process; a cluster brings its own workers.
    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                                                  dashboard_address=None)
    with Client(scheduler or cluster) as client:
        futures = client.map(run_participant, [bids_dir] * len(labels), [output_dir] * len(labels), labels,
                             [extra] * len(labels), pure=False)
        results = client.gather(futures)
    if cluster is not None:
        cluster.close()
    if group:  # the group level needs only the dataset query flags
        query = [a for a in extra if a.startswith("--mrsi-")]
        subprocess.run([*ftddm_command(), "bids", bids_dir, output_dir, "group", *query], check=False)
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bids_dir")
    p.add_argument("output_dir")
    p.add_argument("--participant-label", nargs="+", help="default: every participant")
    p.add_argument("--scheduler", help="address of a Dask scheduler (default: a LocalCluster on this machine)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default: 2)")
    args = p.parse_args(own)
    labels = args.participant_label or participants(args.bids_dir)
    results = run_cohort(args.bids_dir, args.output_dir, labels, extra, scheduler=args.scheduler,
                         workers=args.workers)
    for r in results:
        print(f"sub-{r['label']}: exit {r['returncode']} in {r['end'] - r['start']:.1f} s")
        if r["returncode"]:
            print("    " + "\n    ".join(r["log"]))
    return 1 if any(r["returncode"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
