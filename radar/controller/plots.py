"""The simulator's results as a PNG: expected speedup per policy and the depths the adaptive ones choose."""

from __future__ import annotations

from radar.controller.simulate import FIXED_PREFIX, SimulationResult


def plot(results: SimulationResult, path) -> None:
    """Save a PNG: expected speedup per policy (left) and the depth histograms of the adaptive ones (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [n for n in results.policies if n.startswith(FIXED_PREFIX) and "@" in n]
    best_pair = results.best_fixed_pair.name if pairs else None
    names = [n for n in results.policies if n not in pairs or n == best_pair]  # of the grid, its best pair only
    speed = [results.policies[n].speedup for n in names]
    learned_or_rule = ("controller", "controller+budget", "threshold", "threshold@budget")
    colors = ["#9aa5b1" if n.startswith(FIXED_PREFIX) else "#2b6cb0" if n in learned_or_rule
              else "#c05621" for n in names]
    adaptive = [n for n in names if not n.startswith(FIXED_PREFIX)]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars = ax1.bar(range(len(names)), speed, color=colors)
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax1.set_ylabel(f"expected speedup vs AR ({results.speedup_basis})")
    lo = min(speed)
    ax1.set_ylim(max(0.0, lo - 0.15 * (max(speed) - lo + 1e-9) - 0.05), max(speed) * 1.04)
    for b, s in zip(bars, speed):
        ax1.annotate(f"{s:.2f}", (b.get_x() + b.get_width() / 2, s), ha="center", va="bottom", fontsize=8)
    if any(n.startswith(FIXED_PREFIX) for n in names):
        best = results.best_fixed
        ax1.axhline(best.speedup, color="#555", ls="--", lw=0.8, label=f"best fixed ({best.name})")
        ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title(f"{results.n_records} held-out records, ratio of means")

    depths = list(range(1, results.t_max + 1))
    width = 0.8 / max(len(adaptive), 1)
    for j, n in enumerate(adaptive):
        h = results.policies[n].depth_hist
        total = max(sum(h), 1)
        ax2.bar([d - 0.4 + width * (j + 0.5) for d in depths], [c / total for c in h], width,
                label=f"{n} (mean {results.policies[n].mean_calls:.2f})")
    ax2.set_xticks(depths, [str(d) for d in depths])
    ax2.set_xlabel("draft calls per cycle")
    ax2.set_ylabel("fraction of cycles")
    ax2.legend(fontsize=8)
    ax2.set_title("chosen depths")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot"]
