"""Draws media/bench.png from bench/results.json: one panel per workload, rafale's bar beside each
alternative's, in the workload's own unit, with the ratio rafale / alternative over each alternative."""

import json
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def draw(results: Path, out: Path = REPO / "media" / "bench.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results).read_text())
    panels: dict[str, list[dict]] = {}
    for r in data["rows"]:
        panels.setdefault(r["workload"], []).append(r)
    cols = 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (workload, rows) in zip(axes.flat, panels.items()):
        names = ["rafale"] + [r["alternative"] for r in rows]
        values = [rows[0]["rafale"]] + [r["alt"] for r in rows]
        bars = ax.bar(range(len(values)), values, color=["#2a7ab9"] + ["#9a9a9a"] * len(rows))
        for i, (bar, v) in enumerate(zip(bars, values)):
            text = fmt(v) if i == 0 else f"{fmt(v)}\n(rafale {rows[i - 1]['ratio']:.2f}x)"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(range(len(values)), [textwrap.fill(n, 18, break_long_words=False) for n in names],
                      fontsize=6.5)
        better = "higher is better" if rows[0]["higher_is_better"] else "lower is better"
        ax.set_ylabel(f"{rows[0]['metric']} ({better})", fontsize=8)
        ax.set_ylim(0, max(values) * 1.3)
        ax.set_title(textwrap.fill(workload, 50), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    m = data["machine"]
    fig.suptitle(f"rafale vs alternatives, same work, same run ({data['date']}): {m['cpu']}, {m['cores']} cores, "
                 f"torch {m['torch']} with {m['torch_threads']} threads, {m['device']}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(draw(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json"))
