"""``align-losses`` installs and works in an environment that has torch and nothing else.

A fresh venv sees the workspace's torch through a ``.pth`` file that names torch's
site-packages directory. A plain path line does not process the ``.pth`` files inside that
directory, so the workspace's editable ``align_*`` installs stay invisible; the test checks that
before installing. The wheel is then built and installed offline (``uv_build`` from uv's cache,
no dependencies resolved), and a subprocess imports it and computes a DPO loss.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def test_installs_and_runs_with_only_torch(tmp_path: Path) -> None:
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not available to build the wheel")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).check_returncode()
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    site.check_returncode()
    torch_site = Path(torch.__file__).resolve().parents[1]
    (Path(site.stdout.strip()) / "torch_only.pth").write_text(f"{torch_site}\n")

    probe = (
        "import importlib.util as u; "
        "print(bool(u.find_spec('torch')), "
        "[m for m in ('align_losses', 'align_data', 'align_core') if u.find_spec(m)])"
    )
    before = _run([str(python), "-c", probe])
    assert before.returncode == 0, before.stderr
    assert before.stdout.strip() == "True []", f"torch missing or workspace leaks: {before.stdout}"

    install = _run(
        [uv, "pip", "install", "--offline", "--no-deps", "--python", str(python), str(PACKAGE)],
        env={**os.environ, "VIRTUAL_ENV": str(venv)},
    )
    assert install.returncode == 0, install.stderr

    script = textwrap.dedent(
        """
        import math, pathlib, torch
        import align_losses
        from align_losses import dpo_loss
        logps = torch.tensor([-12.5, -3.0])
        out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
        assert torch.allclose(out.losses, torch.full((2,), math.log(2.0))), out.losses
        root = pathlib.Path(align_losses.__file__).parent
        assert (root / "py.typed").exists()
        print(root)
        """
    )
    run = _run([str(python), "-c", script])
    assert run.returncode == 0, run.stderr
    installed_at = Path(run.stdout.strip().splitlines()[-1])
    assert installed_at.is_relative_to(venv), f"imported from {installed_at}, not the venv"
