"""What a benchmark writes: the machine and settings every result JSON starts with, the JSON,
PNG plots beside it (matplotlib, Agg backend), and markdown tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import sglang
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "sglang": sglang.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def header(args) -> dict:
    """What every result JSON starts with: the machine, when, and every setting of the run."""
    return {"machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "settings": {k: v for k, v in vars(args).items()}}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']} ({m['cpu_count']} cores), GPU: {m['gpu']}, "
            f"torch {m['torch']}, sglang {m['sglang']}")


def write_json(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def finish(result: dict, out, plot: Callable, report: Callable, plots=(".png",)) -> dict:
    """Write the JSON and the plots beside it, print the report."""
    write_json(out, result)
    plot(result, *(sibling(out, suffix) for suffix in plots))
    print(report(result))
    return result


def sibling(out: str | os.PathLike, suffix: str) -> Path:
    """benchmarks/results/x.json -> benchmarks/results/x<suffix> (plots beside the JSON)."""
    out = Path(out)
    return out.with_name(out.stem + suffix)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
