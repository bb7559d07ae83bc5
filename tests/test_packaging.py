import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_names_do_not_collide():
    # Run from the repository root, where a top-level kernels/ directory exists.
    out = subprocess.run(
        [sys.executable, "-c",
         "import kernels, sglang_lenvm.kernels as k; print(kernels.__file__); print(k.__path__)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert "site-packages" in out[0], out  # PyPI's `kernels`, which sglang imports
    assert str(ROOT / "kernels") in out[1], out


def test_plugin_entry_point_registered():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="sglang.srt.plugins")}
    assert eps.get("lenvm") == "sglang_lenvm.plugin:register"
