"""`pdserve bench --plot DIR`: PNGs of a run (matplotlib, the `pdserve[bench]` extra).

- `latency_cdf.png`: the CDFs of TTFT, TPOT, ITL and end-to-end latency, one line per run.
- `throughput_vs_rate.png` (with two runs or more, e.g. `--sweep`): request throughput and
  goodput against the offered request rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pdserve.cluster.bench_report import RequestRecord


def plot_report(
    folder: str | Path, records: Mapping[str, Sequence[RequestRecord]], runs: Sequence[dict]
) -> list[Path]:
    """Writes the plots into `folder` (created if needed); returns their paths."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench: --plot needs matplotlib: pip install 'pdserve[bench]'") from None
    matplotlib.use("Agg")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_latency_cdfs(folder / "latency_cdf.png", records)]
    rated = [r for r in runs if r["rate"] != "inf"]
    if len(rated) >= 2:
        paths.append(_throughput_vs_rate(folder / "throughput_vs_rate.png", rated))
    return paths


def _latency_cdfs(path: Path, records: Mapping[str, Sequence[RequestRecord]]) -> Path:
    import matplotlib.pyplot as plt

    panels = (
        ("TTFT", lambda rs: [r.ttft for r in rs]),
        ("TPOT", lambda rs: [t for r in rs if (t := r.tpot) is not None]),
        ("ITL", lambda rs: [gap for r in rs for gap in r.itl]),
        ("end-to-end latency", lambda rs: [r.e2e for r in rs]),
    )
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values) in zip(axes.flat, panels):
        for name, rs in records.items():
            ms = sorted(1e3 * v for v in values([r for r in rs if r.ok]))
            if ms:
                ax.step(ms, [(i + 1) / len(ms) for i in range(len(ms))], where="post", label=name)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests" if title != "ITL" else "fraction of tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _throughput_vs_rate(path: Path, runs: Sequence[dict]) -> Path:
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, rates, ":", color="grey", label="offered rate")
    ax.plot(rates, [r["request_throughput"] for r in runs], "o-", label="throughput")
    ax.plot(rates, [r["goodput"] for r in runs], "s-", label=f"goodput ({_slo_text(runs[0])})")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("completed requests/s")
    ax.set_title("throughput and goodput vs request rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _slo_text(run: dict) -> str:
    bounds = [f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in run["slo"].items() if v]
    return ", ".join(bounds) or "no SLO"
