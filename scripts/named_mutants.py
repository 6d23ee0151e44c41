"""The one-line bugs issue 15 found unguarded, applied one at a time to a copy of the package: each must
make its focused tests fail. ``python scripts/named_mutants.py`` (or ``bash scripts/mutation.sh named``).

Each bug is a literal replacement in one file; when the original text is gone (the code was rewritten),
the bug is reported as STALE so the list can be brought up to date. Exit status: 0 when every bug is
killed, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, file, original text, bug, tests that must catch it)
BUGS = [
    ("MAD constant of the robust threshold", "sinkless/scan/norms.py",
     "rule.k * 1.4826 * mad", "rule.k * 1.0 * mad", ["tests/test_norms.py"]),
    ("'>' -> '>=' on the outlier threshold", "sinkless/scan/measure.py",
     "(norms > tau[:, None]) & mask", "(norms >= tau[:, None]) & mask", ["tests/test_scan.py"]),
    ("first-token attention counted from the wrong start", "sinkless/scan/measure.py",
     "warm = min(first + settings.warmup, n_tokens - 1)", "warm = min(settings.warmup, n_tokens - 1)", ["tests/test_scan.py"]),
    ("first-token attention read at index 0", "sinkless/scan/measure.py",
     "first = first_token(layout)", "first = 0", ["tests/test_scan.py"]),
    ("outlier_fraction over all tokens instead of body tokens", "sinkless/scan/report.py",
     "n_body += len(body)", "n_body += r.layout.n_tokens", ["tests/test_report.py", "tests/test_scan.py"]),
    ("has_artifacts on 1 layer instead of >= 2", "sinkless/scan/report.py",
     "persistent = len(outlier_layers) >= min(2, len(layers))", "persistent = len(outlier_layers) >= 1", ["tests/test_report.py", "tests/test_scan.py"]),
    ("discovery scoring over all tokens instead of outlier positions", "sinkless/registers/discovery.py",
     "tally.score_sum[d, l] += hidden[l][positions].mean(0)", "tally.score_sum[d, l] += hidden[l].mean(0)", ["tests/test_discovery.py"]),
    ("LOST expanding k + 1 candidates", "sinkless/tasks/lost.py",
     "candidates = order[:k]", "candidates = order[: k + 1]", ["tests/test_tasks_lost.py"]),
    ("Hooks.__init__ leaving handles when a later site fails", "sinkless/hooks.py",
     "        except BaseException:\n            self.remove()\n            raise",
     "        except BaseException:\n            raise", ["tests/test_hooks.py"]),
]


def run(name: str, path: str, old: str, new: str, tests: list[str]) -> str:
    source = (ROOT / path).read_text(encoding="utf-8")
    if source.count(old) != 1:
        return "STALE (original text not found once)"
    with tempfile.TemporaryDirectory(prefix="sinkless-mutant-") as tmp:
        shutil.copytree(ROOT / "sinkless", Path(tmp) / "sinkless", ignore=shutil.ignore_patterns("__pycache__", "data"))
        os.symlink(ROOT / "sinkless" / "data", Path(tmp) / "sinkless" / "data")
        shutil.copytree(ROOT / "tests", Path(tmp) / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp)
        (Path(tmp) / path).write_text(source.replace(old, new), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        # run from the copy: its folder comes first on sys.path, before the editable install
        check = subprocess.run([sys.executable, "-c", "import sinkless; print(sinkless.__file__)"], cwd=tmp, env=env, capture_output=True, text=True)
        assert check.stdout.strip().startswith(tmp), f"the mutated copy is not the one imported: {check.stdout} {check.stderr}"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests],
            cwd=tmp, env=env, capture_output=True, text=True,
        )
    if result.returncode == 1:
        failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
        return "killed by " + (failed[0].split("::")[-1] if failed else "a failing test")
    if result.returncode == 0:
        return "SURVIVED"
    return f"ERROR (pytest exit {result.returncode}): {result.stdout[-500:]}{result.stderr[-500:]}"


def main() -> int:
    width = max(len(b[0]) for b in BUGS)
    bad = 0
    for name, path, old, new, tests in BUGS:
        verdict = run(name, path, old, new, tests)
        bad += not verdict.startswith("killed")
        print(f"{name:<{width}}  {path:<32}  {verdict}", flush=True)
    print(f"{len(BUGS) - bad} of {len(BUGS)} named bugs killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
