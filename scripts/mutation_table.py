"""Per-module table of the last mutmut run (``bash scripts/mutation.sh table``; ``-v`` survivors, ``-u`` unchecked, ``-n`` no tests).

Reads mutmut's results under mutants/; a survivor counts as equivalent when scripts/mutation_equivalent.txt
names it AND its mutated line still reads as recorded there (mutant numbers shift when code changes: a
stale entry is reported and the survivor counts as a survivor). Score = (killed + timeout) /
(checked - equivalent); "no tests" mutants (no fast test reaches the code) count as not killed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("killed", "timeout", "survived", "equivalent", "no tests", "other")


def equivalents() -> dict[str, tuple[str, str]]:
    """{mutant name: (mutated line, reason)} from scripts/mutation_equivalent.txt (``name | + line | reason``)."""
    table = {}
    path = ROOT / "scripts" / "mutation_equivalent.txt"
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, rest = line.split(" | ", 1)  # the mutated line may hold " | " itself (type unions): the reason is after the last
            mutated, reason = rest.rsplit(" | ", 1)
            name, mutated, reason = name.strip(), mutated.strip(), reason.strip()
            table[name] = (mutated, reason)
    return table


def mutated_line(name: str) -> str | None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    try:
        diff = get_diff_for_mutant(name)
    except Exception:  # noqa: BLE001 - a mutant mutmut cannot show is simply not matched
        return None
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " ".join(added)


def main() -> int:
    import os

    from mutmut.stats import status_by_exit_code

    os.chdir(ROOT)
    known = equivalents()
    rows: dict[str, Counter] = {}
    survivors, stale, unchecked, untested = [], [], {}, []
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        module = str(meta.relative_to(ROOT / "mutants"))[: -len(".py.meta")].replace("/", ".").removesuffix(".__init__")
        for name, code in data.get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            status = {"caught by type check": "killed"}.get(status, status)
            status = status if status in COLUMNS or status in ("not checked", "skipped") else "other"
            if status == "not checked":
                unchecked.setdefault(module, []).append(name)
                continue
            if status == "survived" and name in known:
                if mutated_line(name) == known[name][0]:
                    status = "equivalent"
                else:
                    stale.append(name)
            if status == "survived":
                survivors.append(name)
            if status == "no tests":
                untested.append(name)
            rows.setdefault(module, Counter())[status] += 1
    if "-n" in sys.argv:  # mutants no test reached when they ran (tests added since may reach them)
        print(*untested, sep="\n")
        return 0
    if "-u" in sys.argv:  # unchecked mutants of the modules that have results (e.g. functions changed since)
        print(*(name for module in rows for name in unchecked.get(module, [])), sep="\n")
        return 0
    if not rows:
        print("no results under mutants/: run `bash scripts/mutation.sh` first")
        return 1
    width = max(len(m) for m in rows) + 2
    header = f"{'module':<{width}}" + "".join(f"{c:>11}" for c in COLUMNS) + f"{'score':>9}"
    print(header)
    print("-" * len(header))
    total = Counter()
    for module, counts in sorted(rows.items()):
        total.update(counts)
        print(f"{module:<{width}}" + "".join(f"{counts[c]:>11}" for c in COLUMNS) + f"{score(counts):>9}")
    print("-" * len(header))
    print(f"{'total':<{width}}" + "".join(f"{total[c]:>11}" for c in COLUMNS) + f"{score(total):>9}")
    partial = {m: len(unchecked[m]) for m in rows if unchecked.get(m)}
    if partial:
        print(f"\nnot checked yet (the table leaves them out): {partial}")
    if stale:
        print(f"\n{len(stale)} entries of mutation_equivalent.txt no longer match their mutant (re-judge them): {', '.join(stale[:10])}")
    if "-v" in sys.argv:
        print("\nsurvivors:", *survivors, sep="\n  ")
    return 0


def score(counts: Counter) -> str:
    judged = sum(counts.values()) - counts["equivalent"] - counts["skipped"]
    return f"{100 * (counts['killed'] + counts['timeout']) / judged:.1f} %" if judged else "-"


if __name__ == "__main__":
    sys.exit(main())
