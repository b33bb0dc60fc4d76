"""The reliability case table, as a user meets it: every bad-input case of memplan/testing/cases.py run as a real
`python -m memplan` process (exit status, lines on stderr, traceback or not), then the fault tests (signals and
orphans, storage, cache, child death, interrupted tunes) through pytest. Writes benchmarks/results/reliability.md.

    python benchmarks/reliability.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memplan.testing.cases import BAD_INPUT, expand, scratch

OUT = Path(__file__).parent / "results" / "reliability.md"
FAULTS = ["tests/test_reliability.py", "tests/test_probe.py::test_cache_faults_never_lose_the_measurement",
          "tests/test_tune.py::test_storage_faults_are_one_line_exit_2",
          "tests/test_tune.py::test_an_interrupted_or_dead_workers_configuration_is_measured_on_resume",
          "tests/test_probe.py::test_hung_child_times_out_and_parent_survives",
          "tests/test_probe.py::test_child_killed_without_result_is_classified",
          "tests/test_probe.py::test_crashing_child_is_an_error_with_its_message",
          "tests/test_spec.py::test_a_cached_hub_repo_never_runs_its_code_unasked"]


def main() -> int:
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        scratch(tmp)
        for args, needle in BAD_INPUT:
            argv = expand(args, tmp)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "memplan", *argv], capture_output=True, text=True,
                                  timeout=300, check=False, stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            ok = proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and \
                needle in proc.stderr
            bad += not ok
            shown = " ".join(a.replace(tmp, "$TMP") for a in argv)
            rows.append(f"| `memplan {shown}` | {proc.returncode} | {proc.stderr.count(chr(10))} | "
                        f"{'OK' if ok else 'FAIL'} | {wall:.1f} s | {proc.stderr.strip()[:110].replace('|', '/')} |")
    faults = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *FAULTS],
                            capture_output=True, text=True, check=False, cwd=Path(__file__).parent.parent)
    results = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED) (\S+)", faults.stdout, re.M)
    bad += sum(status != "PASSED" for status, _ in results) + (faults.returncode != 0)
    lines = ["# Reliability: the case table", "",
             "Produced by `python benchmarks/reliability.py` (every row a real process or a pytest run on this "
             "machine).", "",
             f"## Bad input: {len(rows)} cases, {sum('| OK |' in r for r in rows)} OK", "",
             "Each must exit 2 with one line on stderr naming the problem, and no traceback.", "",
             "| command | exit | stderr lines | verdict | wall | the line |", "|---|---|---|---|---|---|", *rows, "",
             f"## Faults: {len(results)} tests, {sum(s == 'PASSED' for s, _ in results)} passed", "",
             "Signals and orphans (real processes, real signals, `/proc`), storage, cache, child death, interrupted "
             "and dead tune workers, remote code.", "", "| test | result |", "|---|---|",
             *[f"| `{name}` | {status} |" for status, name in results], ""]
    OUT.write_text("\n".join(lines))
    print(f"{len(rows)} bad-input cases, {len(results)} fault tests, {bad} not OK -> {OUT}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
