"""One table: none / ttr / distilled rows of planted-vit, with planted-vit-clean's none row, per task and data.

The rows come from compare.sh (cmp_*: none, ttr and distilled in one command); where a cmp_ file is missing,
from the earlier separate runs (base_* for none / ttr, dist_* for distilled)."""
import json, os
here = os.path.dirname(os.path.abspath(__file__))
runs = [("mini", "zeroseg", "zeroseg (miou)"), ("mini", "lost", "LOST keys, l2, median gram bias (corloc)"),
        ("mini", "probe", "probe foreground (miou)"), ("syn", "zeroseg", "zeroseg (miou)"),
        ("syn", "lost", "LOST keys, l2, median gram bias (corloc)"), ("syn", "lostv", "LOST values (corloc)"),
        ("syn", "probe", "probe classes (miou)")]
print("| data | task (metric) | none | ttr | distilled | clean twin |")
print("|---|---|---|---|---|---|")
for data, task, label in runs:
    def rows(prefix):
        path = os.path.join(here, f"{prefix}_{data}_{task}.json")
        if not os.path.exists(path):
            return {}
        d = json.load(open(path))
        return {r["fix"]: r[d["metric"]] for r in d["results"]}
    base, dist, clean = rows("base"), rows("dist"), rows("clean")
    if rows("cmp"):
        base = dist = rows("cmp")
    f = lambda v: "–" if v is None else f"{v:.1f}"
    print(f"| {'mini' if data == 'mini' else 'synthetic'} | {label} | {f(base.get('none'))} | {f(base.get('ttr'))} | {f(dist.get('distilled'))} | {f(clean.get('none'))} |")
