"""`cxr` starts fast: loading the CLI (what `cxr --help` and every command do first) imports neither pandas
nor the shard builder; they load inside the commands that need them."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from cxrshards.build import BuildConfig
from tests.test_shard_support import REPO

HEAVY = ("pandas", "pyarrow", "cxrshards.build", "h5py", "torch")


def test_loading_the_cli_imports_no_heavy_module():
    code = ("import sys\nfrom cli.app import _register\n_register()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported when the CLI loads: {out.stdout.strip()}"


def test_shard_build_cli_defaults_are_the_build_config_defaults():
    from cli.shard_cmd import DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(BuildConfig)}
    assert DEFAULTS == {k: defaults[k] for k in DEFAULTS}
