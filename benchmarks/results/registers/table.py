"""One table: none / ttr / distilled rows of planted-vit, with planted-vit-clean's none row, per task and data.

    python benchmarks/results/registers/table.py [--fix FIX] [--dir FOLDER] [PREFIX ...]

The rows come from compare.sh (PREFIX_*: none, ttr and distilled in one command; PREFIX defaults to cmp, the
student of docs/RESULTS.md; more prefixes add one distilled column each, e.g. ``cmp cmp23 cmpN``); where a cmp_
file is missing, from the earlier separate runs (base_* for none / ttr, dist_* for distilled); a missing file of any
other prefix is a "–" cell. ``--fix dvt --dir benchmarks/results/dvt_keys``: the third fix's column of compare
files in another folder (there the first prefix gives none and ttr; the clean twin's row stays this folder's)."""
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
runs = [("mini", "zeroseg", "zeroseg (miou)"), ("mini", "lost", "LOST keys, l2, median gram bias (corloc)"),
        ("mini", "probe", "probe foreground (miou)"), ("syn", "zeroseg", "zeroseg (miou)"),
        ("syn", "lost", "LOST keys, l2, median gram bias (corloc)"), ("syn", "lostv", "LOST values (corloc)"),
        ("syn", "probe", "probe classes (miou)")]
args = sys.argv[1:]
fix, folder = "distilled", here
while args and args[0] in ("--fix", "--dir"):
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
        return {r["fix"]: r[d["metric"]] for r in d["results"]}
    base, clean = rows("base", here), rows("clean", here)
    dists = []
    for prefix in prefixes:
        found = rows(prefix)
        if found and prefix == prefixes[0] and (prefix.startswith("cmp") or folder != here):  # none and ttr from the same command
            base = found
        if not found and prefix == "cmp":  # only the default column falls back on the earlier separate runs
            found = rows("dist")
        dists.append(found.get(fix))  # a missing file of another prefix shows as "–", never as another run's
    f = lambda v: "–" if v is None else f"{v:.1f}"
    print(f"| {'mini' if data == 'mini' else 'synthetic'} | {label} | {f(base.get('none'))} | {f(base.get('ttr'))} | "
          f"{' | '.join(f(v) for v in dists)} | {f(clean.get('none'))} |")
