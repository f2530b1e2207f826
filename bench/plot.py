"""Draws media/bench.png from bench/results.json: one bar per comparison, rafale / alternative,
oriented so that right of 1 means rafale is better (times and memory are inverted)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def draw(results: Path, out: Path = REPO / "media" / "bench.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results).read_text())
    rows = [r for r in data["rows"] if r["alt"]]
    labels, values = [], []
    for r in rows:
        advantage = r["ratio"] if r["higher_is_better"] else 1 / r["ratio"]
        labels.append(f"{r['workload']}\nvs {r['alternative']}")
        values.append(advantage)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.4))
    y = range(len(rows))[::-1]
    colors = ["#2a7ab9" if v >= 1 else "#c44e52" for v in values]
    ax.barh(list(y), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("rafale's advantage (x, log scale; > 1: rafale faster / smaller)")
    m = data["machine"]
    ax.set_title(f"rafale vs alternatives, same work, same run ({data['date']})\n"
                 f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['device']}",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json"))
