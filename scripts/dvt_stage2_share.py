#!/usr/bin/env python3
# usage: python scripts/dvt_stage2_share.py MODEL TWIN STORED_MEASURE_JSON N DENOISER_DIR HELDOUT_DIR OUT_JSON  (docs/RESULTS.md, Denoising ViTs)
"""Stage 2's share of Stage 1's gain on held-out images, reusing the Stage-1 figures of measure pos/planted
(same images, same settings, same seeded views): only the twin's Stage 1 is refitted here (its raw-vs-twin-S1
cosine is checked against the stored one), and the denoiser is applied to the planted model's raw features."""
import json, sys, torch, torch.nn.functional as F
torch.set_num_threads(1)
from PIL import Image
from sinkless import zoo
from sinkless.denoise.stage1 import Stage1Settings, fit, image_pixels
from sinkless.denoise.views import feature_reader, make_views
from sinkless.denoise.stage2 import load_denoiser

model, twin, stored, n, denoiser_dir, image_dir, out_json = sys.argv[1:8]
n = int(n)
rows_stored = json.load(open(stored))["per_image"]
planted, clean = zoo.load(model), zoo.load(twin)
den = load_denoiser(denoiser_dir)
s = Stage1Settings()
cos = lambda a, b: float(F.cosine_similarity(a, b, dim=-1).mean())
out = []
for i in range(n):
    im = Image.open(f"{image_dir}/h{i:03d}.png").convert("RGB")
    px = image_pixels(planted, im)
    feats = {}
    for key, loaded in (("a", planted), ("b", clean)):
        views = make_views(feature_reader(loaded, s.features, s.layer), px, s.views, torch.Generator().manual_seed(s.seed),
                           scale=s.scale, ratio=s.ratio, flip=s.flip) if key == "b" else None
        if key == "a":
            with torch.no_grad():
                feats["raw"] = feature_reader(loaded, s.features, s.layer)(px)[0]
        else:
            m, _ = fit(views, s)
            with torch.no_grad():
                feats["twin_s1"] = m.clean(views.coords[-1])
            feats["raw_views"] = views.features[-1]
    with torch.no_grad():
        s2 = den(feats["raw"][None])[0]
    st = rows_stored[i] if "cos_raw_stage1twin" in rows_stored[i] else rows_stored[i]["output"]
    row = {"image": f"h{i:03d}", "raw": cos(feats["raw"], feats["twin_s1"]), "raw_stored": st["cos_raw_stage1twin"],
           "stage1_stored": st["cos_stage1_stage1twin"], "stage2": cos(s2, feats["twin_s1"])}
    print(row, flush=True); out.append(row)
mean = {k: sum(r[k] for r in out) / len(out) for k in ("raw", "raw_stored", "stage1_stored", "stage2")}
mean["share"] = (mean["stage2"] - mean["raw_stored"]) / (mean["stage1_stored"] - mean["raw_stored"])
print(json.dumps(mean), flush=True)
json.dump({"model": model, "twin": twin, "rows": out, "mean": mean}, open(out_json, "w"), indent=1)
