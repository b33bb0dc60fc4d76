"""Every command's bad input (memplan/testing/cases.py, 102 cases): exit 2, one line on stderr, no traceback."""

import pytest

from memplan.cli import main
from memplan.testing.cases import BAD_INPUT, expand, scratch


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    scratch(str(folder))
    return str(folder)


def test_the_table_covers_every_command():
    commands = {args[0] for args, _ in BAD_INPUT}
    assert len(BAD_INPUT) >= 80
    assert {"estimate", "trace", "fit", "tune", "probe", "run", "models", "gpus"} <= commands


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(args, needle, tmp, capsys):
    if "NVML" in needle:
        try:
            from memplan.spec.hardware import detect_gpu

            detect_gpu()
            pytest.skip("this machine has an NVIDIA GPU")
        except Exception:  # noqa: BLE001 - no GPU: the case applies
            pass
    rc = main(expand(args, tmp))
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out[-500:], err)
    assert err.startswith("memplan: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
