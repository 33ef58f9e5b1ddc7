import subprocess
import sys

import normlab
from normlab.cli import main


def test_cli_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert normlab.__version__ in capsys.readouterr().out
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "norms" in capsys.readouterr().out


def test_cli_norms_lists_registry(capsys):
    assert main(["norms"]) == 0
    out = capsys.readouterr().out
    for name in normlab.available_norms():
        assert name in out


def test_console_entry_point_runs_as_module():
    r = subprocess.run(
        [sys.executable, "-m", "normlab", "--version"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and normlab.__version__ in r.stdout


def test_public_api_is_exported():
    for name in [
        "make_norm",
        "available_norms",
        "convert",
        "convert_conv",
        "WSConv2d",
        "WSConv1d",
        "WSLinear",
        "BCNorm",
        "StandardizationLoss",
    ]:
        assert hasattr(normlab, name), name
