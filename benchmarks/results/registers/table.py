"""One table: none / ttr / distilled rows of planted-vit, with planted-vit-clean's none row, per task and data.

    python benchmarks/results/registers/table.py [--fix FIX] [--dir FOLDER] [--ci | --ci-clean] [PREFIX ...]

The rows come from compare.sh (PREFIX_*: none, ttr and distilled in one command; PREFIX defaults to cmp, the
student of docs/RESULTS.md; more prefixes add one distilled column each, e.g. ``cmp cmp23 cmpN``); where a cmp_
file is missing, from the earlier separate runs (base_* for none / ttr, dist_* for distilled); a missing file of any
other prefix is a "–" cell. ``--fix dvt --dir benchmarks/results/dvt_keys``: the third fix's column of compare
files in another folder (there the first prefix gives none and ttr; the clean twin's row stays this folder's).
``--ci``: each cell beside none also shows its difference to none with the paired 95 % bootstrap interval over the
images (``vs_none`` of compare files written since the intervals exist; the clean twin's from its own file by
``sinkless.tasks.uncertainty.paired``); "n/a" where a file predates them. ``--ci-clean``: the same against the clean
twin's row instead (is a fix "close to clean"? an interval holding 0 cannot tell them apart)."""
import json, os, sys
from sinkless.tasks.uncertainty import paired
here = os.path.dirname(os.path.abspath(__file__))
runs = [("mini", "zeroseg", "zeroseg (miou)"), ("mini", "lost", "LOST keys, l2, median gram bias (corloc)"),
        ("mini", "probe", "probe foreground (miou)"), ("syn", "zeroseg", "zeroseg (miou)"),
        ("syn", "lost", "LOST keys, l2, median gram bias (corloc)"), ("syn", "lostv", "LOST values (corloc)"),
        ("syn", "probe", "probe classes (miou)")]
args = sys.argv[1:]
fix, folder, ci = "distilled", here, False
while args and args[0] in ("--fix", "--dir", "--ci", "--ci-clean"):
    if args[0] in ("--ci", "--ci-clean"):
        ci, args = args[0][5:] or "none", args[1:]
        continue
    option, value, args = args[0], args[1], args[2:]
    fix, folder = (value, folder) if option == "--fix" else (fix, os.path.abspath(value))
prefixes = args or ["cmp"]
names = [fix] if prefixes == ["cmp"] else [f"{fix} ({p})" for p in prefixes]
print(f"| data | task (metric) | none | ttr | {' | '.join(names)} | clean twin |")
print("|---|---|---|---|" + "---|" * len(names) + "---|")
for data, task, label in runs:
    def rows(prefix, where=None):
        path = os.path.join(where or folder, f"{prefix}_{data}_{task}.json")
        if not os.path.exists(path):
            return {}
        d = json.load(open(path))
        return {r["fix"]: dict(r, metric=d["metric"], task=d["task"]) for r in d["results"]}
    base, clean = rows("base", here), rows("clean") or rows("clean", here)  # the twin: FOLDER's clean_* files first
    dists = []
    for prefix in prefixes:
        found = rows(prefix)
        if found and prefix == prefixes[0] and (prefix.startswith("cmp") or folder != here):  # none and ttr from the same command
            base = found
        if not found and prefix == "cmp":  # only the default column falls back on the earlier separate runs
            found = rows("dist")
        dists.append(found.get(fix))  # a missing file of another prefix shows as "–", never as another run's
    none, twin = base.get("none"), clean.get("none")
    reference = twin if ci == "clean" else none

    def f(row):
        if row is None:
            return "–"
        text = f"{row[row['metric']]:.1f}"
        if not ci or row is reference or reference is None:
            return text
        versus = row.get("vs_none") if ci == "none" else None
        versus = versus or paired(row["task"], row, reference, row["metric"])
        if versus is None:
            return text + " (n/a)"
        low, high = versus["ci95"]
        return text + f" ({versus['delta']:+.1f} [{low:+.1f}, {high:+.1f}])"
    print(f"| {'mini' if data == 'mini' else 'synthetic'} | {label} | {f(none)} | {f(base.get('ttr'))} | "
          f"{' | '.join(f(v) for v in dists)} | {f(twin)} |")
