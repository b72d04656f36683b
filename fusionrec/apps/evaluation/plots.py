"""``fusionrec evaluate --plot``: HitRate@10 over event time, one panel per split."""

from __future__ import annotations

import numpy as np

from fusionrec.apps.evaluation.metrics import SPLITS, MethodScore, SplitScores

_TITLES = {"overall": "all items", "repeat": "repeat (items the user had before)",
           "explore": "explore (items new to the user)", "cold_start": "cold start (items < 5 interactions)"}


def bucket_means(timeline: list[tuple[int, int]], origin: int, bucket: int, n: int) -> np.ndarray:
    """Mean hit per time bucket; NaN where no basket fell in the bucket (drawn as a gap, not a zero)."""
    means = np.full(n, np.nan)
    count, total = _bucketed(timeline, origin, bucket, n)
    np.divide(total, count, out=means, where=count > 0)
    return means


def bucket_counts(timeline: list[tuple[int, int]], origin: int, bucket: int, n: int) -> np.ndarray:
    """Baskets per time bucket (drawn under the lines, so a thin bucket reads as one)."""
    return _bucketed(timeline, origin, bucket, n)[0]


def _bucketed(timeline: list[tuple[int, int]], origin: int, bucket: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    ts = np.array([t for t, _ in timeline], dtype=np.int64)
    hits = np.array([h for _, h in timeline], dtype=float)
    b = (ts - origin) // bucket
    return np.bincount(b, minlength=n)[:n], np.bincount(b, weights=hits, minlength=n)[:n]


def bucket_size(span_ms: int) -> int:
    """Weekly buckets when the data spans weeks, hourly over hours, else 10 minutes."""
    return 7 * 86_400_000 if span_ms > 21 * 86_400_000 else 3_600_000 if span_ms > 6 * 3_600_000 else 600_000


def plot(scores: dict[str, SplitScores], path: str, title: str) -> None:
    """The four splits side by side (2 × 2), one line per method, the legend beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamps = [t for s in scores.values() for t, _ in s.splits["overall"].timeline]
    if not stamps:
        return
    origin, bucket = min(stamps), bucket_size(max(stamps) - min(stamps))
    n = (max(stamps) - origin) // bucket + 1
    x = (origin + np.arange(n) * bucket).astype("datetime64[ms]")
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(2, 2, figsize=(14, 7.5), sharex=True, sharey=True)
    width = np.timedelta64(bucket, "ms")
    for ax, split in zip(axes.flat, SPLITS, strict=True):
        # every method is scored on the same baskets: the first one's timeline counts them
        counts = bucket_counts(next(iter(scores.values())).splits[split].timeline, origin, bucket, n)
        if counts.any():
            bars = ax.twinx()
            bars.bar(x, counts, width=width, color="0.9", zorder=0)
            bars.set_ylim(0, counts.max() * 4)  # the bars keep to the panel's lowest quarter
            bars.set_yticks([0, int(counts.max())])
            bars.tick_params(labelsize=7, colors="0.5")
            bars.set_ylabel("baskets", fontsize=7, color="0.5")
            ax.set_zorder(bars.get_zorder() + 1)
            ax.patch.set_visible(False)
        for c, (name, s) in enumerate(scores.items()):
            score: MethodScore = s.splits[split]
            if score.n:
                ax.plot(x, bucket_means(score.timeline, origin, bucket, n), color=colours(c % 20),
                        label=f"{name} ({score.summary()['hit_rate@10']:.3f})" if split == "overall" else name)
        ax.set_title(f"{_TITLES[split]}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("HitRate@10")
    fig.suptitle(title)
    fig.autofmt_xdate()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
