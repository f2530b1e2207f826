"""rafale's benchmarks, side by side with the alternatives on the same work in the same run.

    python bench/run.py            # full: about 10 minutes on an idle 2-core CPU
    python bench/run.py --quick    # fewer repetitions and steps: about 5 minutes
    python bench/run.py --only train,generation --plot

Prints one table (workload, rafale's figure, the alternative's, ratio = rafale / alternative, the
goal) under a line describing the machine, and writes every measurement to bench/results.json
(--only replaces the rows of the workloads it runs and keeps the others; --plot also draws
media/bench.png from it). See bench/README.md for what each workload measures.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORKLOADS = ("train", "tiny", "generation", "data", "startup", "packing")
RESULTS = Path(__file__).resolve().parent / "results.json"


def fmt(value: float, metric: str) -> str:
    if metric == "s":
        return f"{value:.3f} s"
    if metric == "MB":
        return f"{value:,.0f} MB"
    if metric == "MB/s":
        return f"{value:.2f} MB/s"
    return f"{value:,.0f} {metric}"


def table(rows: list[dict]) -> str:
    head = ["workload", "rafale", "alternative", "alternative's", "ratio", "goal"]
    body = [[r["workload"], fmt(r["rafale"], r["metric"]), r["alternative"], fmt(r["alt"], r["metric"]),
             "n/a" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}x", r["goal"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    return (f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
            f"device {m['device']}, python {m['python']}; load average {m['load_before']} before, "
            f"{m['load_after']} after")


def save(rows: list[dict], m: dict, quick: bool, chosen: list[str]) -> None:
    """bench/results.json: this run's rows, each with its workload group and date, after the rows an
    earlier run wrote for the workloads this one did not run (--only), so a partial run drops none."""
    date = time.strftime("%Y-%m-%d %H:%M")
    kept = []
    if RESULTS.exists():
        # rows of a file older than the groups (none has one) cannot be told apart: they are dropped
        kept = [r for r in json.loads(RESULTS.read_text()).get("rows", []) if r.get("group") not in (None, *chosen)]
    rows = kept + [dict(r, date=date) for r in rows]
    RESULTS.write_text(json.dumps({"machine": m, "quick": quick, "date": date, "rows": rows}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions: a few minutes on 2 cores")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--plot", action="store_true", help="also draw media/bench.png")
    a = p.parse_args()
    chosen = [w.strip() for w in a.only.split(",") if w.strip()]
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")

    m = common.machine()
    m["load_before"] = m.pop("load_avg_1m")
    if m["load_before"] > 1.5:
        print(f"warning: load average {m['load_before']} > 1.5: other processes share the CPU and the "
              f"figures will be noisy", file=sys.stderr)
    print(f"rafale benchmarks ({'quick' if a.quick else 'full'}), {', '.join(chosen)}", flush=True)
    import data_prep
    import generation
    import packing
    import startup
    import tiny_train
    import train_throughput

    modules = {"train": train_throughput, "tiny": tiny_train, "generation": generation, "data": data_prep,
               "startup": startup, "packing": packing}
    rows, t_start = [], time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        rows += [dict(r, group=name) for r in modules[name].run(a.quick, log=lambda msg: print(msg, flush=True))]
        print(f"  {time.perf_counter() - t0:.0f}s", flush=True)
    m["load_after"] = round(os.getloadavg()[0], 2)
    print()
    print(machine_line(m))
    print(table(rows))
    print(f"\n({time.perf_counter() - t_start:.0f}s in all; ratio = rafale / alternative)")
    save(rows, m, a.quick, chosen)
    if a.plot:
        import plot

        print(f"plot: {plot.draw(RESULTS)}")


if __name__ == "__main__":
    main()
