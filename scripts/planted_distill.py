"""Measurements behind docs/RESULTS.md, "Registers by training" (planted-vit, whose artifacts are known).

    python scripts/planted_distill.py init --json init.json          # add_registers(planted-vit, 4) at init
    python scripts/planted_distill.py eval STUDENT_DIR --json eval.json   # a `sinkless distill` result
    python scripts/planted_distill.py ceiling [STUDENT_DIR ...] --json ceiling.json   # how much of the ceiling is shared views
    python scripts/planted_distill.py fit STUDENT_DIR ... --images DIR --json fit.json   # students vs their target on training photos
    python scripts/planted_distill.py ablate STUDENT_DIR OUT_DIR --json ablate.json   # the student without its trained
        # positions (OUT_DIR/original-positions) and without its registers (OUT_DIR/no-registers), for `sinkless compare`

Held-out images: the 8 photos of the mini set (`--data mini`) at 224 px, and 48 crops (seed 777) of the
bundled photos that are in no training set (astronaut, coffee, chelsea, rocket, camera, coins,
motorcycle_left). The yardstick is the clean twin's teacher-denoised features (10 views, shifts
within ±3 patches, flips, white fill): what an artifact-free model's averaged features look like.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
import torch.nn.functional as F

from sinkless import zoo
from sinkless.adapters import adapter_for
from sinkless.hooks import hooks
from sinkless.images import natural_crops, to_pixels
from sinkless.planted import planted_tokens
from sinkless.registers import ViewSettings, add_registers, denoise_views
from sinkless.registers.multiview import final_patch_features
from sinkless.tasks.data import open_dataset

HELD_OUT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "motorcycle_left")
VIEWS = ViewSettings(views=10, max_shift=3, fill="white")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _outputs(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixels).last_hidden_state


def init(args) -> dict:
    """add_registers(planted-vit, 4): weights kept, output change at init, save -> plain transformers load."""
    from transformers import Dinov2WithRegistersModel

    from sinkless.registers.add import _to_dinov2_with_registers

    planted = zoo.load("planted-vit")
    images = list(open_dataset("mini").images())
    result = {"model": "planted-vit", "n_registers": 4, "images": "the 8 mini photos"}
    student = add_registers(planted.model, 4).eval()
    state = student.state_dict()
    result["pretrained_weights_unchanged"] = all(torch.equal(state[k], v) for k, v in planted.model.state_dict().items())
    switch_only = _to_dinov2_with_registers(planted.model, planted.adapter, 0, 0.0, 0, next(planted.model.parameters())).eval()
    for size in (224, 518):  # 518: dinov2-s-focus's native size (37 x 37 position embeddings, no interpolation)
        pixels = to_pixels(images, planted.image_spec, size=size)
        plain, with_reg, switched = _outputs(planted.model, pixels), _outputs(student, pixels), _outputs(switch_only, pixels)
        reg_out = torch.cat([with_reg[:, :1], with_reg[:, 5:]], 1)  # registers dropped: CLS + patches

        def change(a, b):
            cos = F.cosine_similarity(a, b, dim=-1)
            return {"cls_cosine": float(cos[:, 0].mean()), "patch_cosine_mean": float(cos[:, 1:].mean()),
                    "patch_cosine_min": float(cos[:, 1:].min()), "cls_max_abs_diff": float((a[:, 0] - b[:, 0]).abs().max()),
                    "patch_max_abs_diff": float((a[:, 1:] - b[:, 1:]).abs().max())}

        result[f"{size}px"] = {
            "with_4_registers_vs_plain": change(reg_out, plain),
            "class_switch_only_vs_plain": change(switched, plain),  # antialiased position interpolation, no register
            "with_4_registers_vs_class_switch": change(reg_out, switched),  # the registers' own effect
        }
    with tempfile.TemporaryDirectory() as folder:
        student.save_pretrained(folder)
        plain_load = Dinov2WithRegistersModel.from_pretrained(folder).eval()
        pixels = to_pixels(images, planted.image_spec)
        result["plain_transformers_reload_max_abs_diff"] = float((_outputs(plain_load, pixels) - _outputs(student, pixels)).abs().max())
    return result


def _held_out() -> dict[str, list]:
    return {"mini": list(open_dataset("mini").images()), "crops": natural_crops(48, seed=777, names=HELD_OUT_PHOTOS)}


def _key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """(B, P, D) last-layer patch keys -> (B, P, P) cosine between the keys of every two patches."""
    unit = F.normalize(keys.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def _key_gap(similar: torch.Tensor, mask: torch.Tensor) -> float | None:
    """Last-layer keys (``similar``: ``_key_similarity``): mean cosine planted->other patches minus other->other (< 0:
    planted keys stand apart)."""
    planted, other = mask.float(), 1 - mask.float()  # (B, P)
    if planted.sum() == 0:
        return None
    to_others = (similar * planted[:, :, None] * other[:, None, :]).sum() / (planted.sum(1) * other.sum(1)).sum()
    among = (similar * other[:, :, None] * other[:, None, :]).sum() / (other.sum(1) ** 2).sum()
    return float(to_others - among)


def _key_auc(similar: torch.Tensor, mask: torch.Tensor) -> float | None:
    """How well the planted positions can be told apart in the last layer's keys (``similar``: ``_key_similarity``):
    the AUC of "a patch's mean key cosine to the image's other patches is lower" for planted vs other patches, pooled
    over images (0.5: not apart; 1: every planted patch is less similar to the rest than every other patch)."""
    p = similar.shape[1]
    mean_to_rest = (similar.sum(2) - similar.diagonal(dim1=1, dim2=2)) / (p - 1)  # (B, P)
    planted, other = mean_to_rest[mask], mean_to_rest[~mask]
    if planted.numel() == 0 or other.numel() == 0:
        return None
    below = (planted[:, None] < other[None, :]).float().mean() + 0.5 * (planted[:, None] == other[None, :]).float().mean()
    return float(below)


def _norm_profile(model, pixels: torch.Tensor) -> list[dict]:
    """Per layer: median over images of max/median patch norm, outlier share (3 x median), register / patch norm ratio."""
    adapter = adapter_for(model)
    sites = [adapter.residual_site(i) for i in range(adapter.num_layers(model))]
    with hooks(model, capture=sites) as rec, torch.no_grad():
        model(pixels)
    rows = []
    for i, site in enumerate(sites):
        norms = rec[site].norm(dim=-1)  # (B, N)
        layout = adapter.layout(model, norms.shape[1], tuple(pixels.shape[-2:]))
        patches = norms[:, layout.body]
        median = patches.median(1, keepdim=True).values
        row = {"layer": i, "max_ratio": float((patches.max(1).values / median[:, 0]).median()),
               "outlier_share": float((patches > 3 * median).float().mean())}
        if layout.n_registers:
            row["registers_norm_ratio"] = float((norms[:, layout.registers].median(1).values / median[:, 0]).median())
            row["registers_max_ratio"] = float((norms[:, layout.registers].max(1).values / median[:, 0]).median())
        rows.append(row)
    return rows


RINGS = ((0, 0), (1, 2), (3, 3), (4, None))  # distance of a patch from the grid's edge, in patches


def _by_ring(features: dict[str, torch.Tensor], reference: torch.Tensor) -> list[dict]:
    """The cosines to the reference and the gap closed per ring of patches: the edge (where planted-vit's plant
    mostly fires), the rings the teacher's ±3-patch shifts fill with white, and the interior."""
    side = int(reference.shape[1] ** 0.5)
    index = torch.arange(side)
    from_edge = torch.minimum(torch.minimum(index[:, None], index[None, :]),
                              torch.minimum(side - 1 - index[:, None], side - 1 - index[None, :])).flatten()  # (P,)
    rows = []
    for low, high in RINGS:
        keep = (from_edge >= low) & (from_edge <= (high if high is not None else side))
        cos = {name: float(F.cosine_similarity(f[:, keep], reference[:, keep], dim=-1).mean()) for name, f in features.items()}
        gap = cos["planted_teacher_denoised"] - cos["planted_raw"]
        rows.append({"rings": f"{low}-{high if high is not None else 'centre'}", "patches": int(keep.sum()), **cos,
                     "gap_closed": (cos["student_raw"] - cos["planted_raw"]) / gap if gap else None})
    return rows


def evaluate(args) -> dict:
    planted, clean = zoo.load("planted-vit"), zoo.load("planted-vit-clean")
    student = zoo.load(args.student)
    result = {"student": args.student, "views": VIEWS.__dict__, "sets": {}}
    for name, images in _held_out().items():
        pixels = to_pixels(images, planted.image_spec)  # (B, 3, 224, 224)
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731  same views for every model
        raw, keys = {}, {}  # final features and last-layer key similarities, one forward per model
        for k, m in (("planted", planted), ("clean", clean), ("student", student)):
            with torch.no_grad():
                raw[k], model_keys = final_patch_features(m.model, pixels, keys=True)
            keys["planted_vit" if k == "planted" else k] = _key_similarity(model_keys)
        reference = denoise_views(clean, pixels, VIEWS, generator=generator())
        teacher, teacher_keys = denoise_views(planted, pixels, VIEWS, generator=generator(), keys=True)
        mask = planted_tokens(planted.model, pixels)[:, 1:]  # (B, P): where planted-vit's plant fires
        student_mask = planted_tokens(student.model, pixels)
        student_mask = student_mask[:, 1 + student.adapter.n_registers(student.model):]
        keys["planted_vit_view_averaged"] = _key_similarity(teacher_keys)  # the target of `distill --key-weight`
        entry = {
            "n_images": len(images),
            "cosine_to_clean_denoised": {
                "clean_raw": _cos(raw["clean"], reference), "planted_raw": _cos(raw["planted"], reference),
                "planted_teacher_denoised": _cos(teacher, reference), "student_raw": _cos(raw["student"], reference),
            },
            "cosine_to_planted_teacher_target": {"planted_raw": _cos(raw["planted"], teacher), "student_raw": _cos(raw["student"], teacher)},
            "cosine_to_clean_raw": {"planted_raw": _cos(raw["planted"], raw["clean"]), "student_raw": _cos(raw["student"], raw["clean"])},
            "planted_patch_share": {"planted_vit": float(mask.float().mean()), "student": float(student_mask.float().mean())},
            "last_layer_key_gap_at_planted_positions": {k: _key_gap(similar, mask) for k, similar in keys.items()},
            "last_layer_key_auc_at_planted_positions": {k: _key_auc(similar, mask) for k, similar in keys.items()},
            "norms": {"planted_vit": _norm_profile(planted.model, pixels), "student": _norm_profile(student.model, pixels),
                      "clean": _norm_profile(clean.model, pixels)},
        }
        ceiling, floor = entry["cosine_to_clean_denoised"]["planted_teacher_denoised"], entry["cosine_to_clean_denoised"]["planted_raw"]
        entry["gap_closed"] = (entry["cosine_to_clean_denoised"]["student_raw"] - floor) / (ceiling - floor)
        entry["by_ring"] = _by_ring({"clean_raw": raw["clean"], "planted_raw": raw["planted"], "planted_teacher_denoised": teacher,
                                     "student_raw": raw["student"]}, reference)
        result["sets"][name] = entry
    return result


def ceiling(args) -> dict:
    """The yardstick's ceiling with the teacher's views drawn independently of the reference's.

    ``evaluate``'s ceiling denoises planted-vit with the very views (seed 0) that the clean reference used, so
    view-specific effects (which shifts filled which patches with white) agree; a student sees one view and can
    at best learn the views' expectation. Here: planted-vit denoised with other seeds and with 40 views (near the
    expectation), the clean twin likewise (the noise floor of the reference itself), and the given students."""
    planted, clean = zoo.load("planted-vit"), zoo.load("planted-vit-clean")
    students = {name: zoo.load(name) for name in args.students}
    many = ViewSettings(views=40, max_shift=VIEWS.max_shift, fill=VIEWS.fill)
    seed = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    result = {"views": VIEWS.__dict__, "many_views": many.__dict__, "sets": {}}
    for name, images in _held_out().items():
        pixels = to_pixels(images, planted.image_spec)
        reference = denoise_views(clean, pixels, VIEWS, generator=seed(0))
        row = {
            "ceiling_same_views": _cos(denoise_views(planted, pixels, VIEWS, generator=seed(0)), reference),
            "ceiling_other_views_seed1": _cos(denoise_views(planted, pixels, VIEWS, generator=seed(1)), reference),
            "ceiling_other_views_seed2": _cos(denoise_views(planted, pixels, VIEWS, generator=seed(2)), reference),
            "ceiling_40_views": _cos(denoise_views(planted, pixels, many, generator=seed(5)), reference),
            "clean_other_views_seed1": _cos(denoise_views(clean, pixels, VIEWS, generator=seed(1)), reference),
            "clean_40_views": _cos(denoise_views(clean, pixels, many, generator=seed(5)), reference),
        }
        with torch.no_grad():
            row["planted_raw"] = _cos(final_patch_features(planted.model, pixels), reference)
            for student, loaded in students.items():
                row[student] = _cos(final_patch_features(loaded.model, pixels), reference)
        floor = row["planted_raw"]
        row["gap_closed_vs_40_view_ceiling"] = {s: (row[s] - floor) / (row["ceiling_40_views"] - floor) for s in students}
        result["sets"][name] = row
    return result


def fit(args) -> dict:
    """How well students reproduce their own teacher's target on (some of) their training photos: every
    ``--every``-th image of ``--images`` in name order, ``--limit`` of them, whole, at 224 px."""
    from pathlib import Path

    from sinkless.registers.distill import load_images

    planted = zoo.load("planted-vit")
    images, names = load_images(args.images)  # what `sinkless distill --images` reads, in the same order
    images, names = images[:: args.every][: args.limit], names[:: args.every][: args.limit]
    pixels = to_pixels(images, planted.image_spec)
    target = denoise_views(planted, pixels, VIEWS, generator=torch.Generator().manual_seed(0))
    result = {"images": [Path(n).name for n in names], "views": VIEWS.__dict__}
    with torch.no_grad():
        result["planted_raw"] = _cos(final_patch_features(planted.model, pixels), target)
        for name in args.students:
            result[name] = _cos(final_patch_features(zoo.load(name).model, pixels), target)
    return result


def ablate(args) -> dict:
    """Two variants of a distilled student of ``--model`` (default planted-vit), to tell which trained part moves a
    task, each a folder for ``--distilled`` or ``--model``: the student with the model's own position embeddings
    (``original-positions``) and the student without its register tokens (``no-registers``: every other weight,
    trained or not, kept)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    student, out = Path(args.student), Path(args.out)

    def fail(message: str):  # one line and exit 2, before anything is written
        print(f"planted_distill.py ablate: {message}", file=sys.stderr)
        raise SystemExit(2)

    if out.exists():
        fail(f"{out} exists; choose a new folder")
    if not (student / "model.safetensors").is_file():
        fail(f"no model.safetensors in {student}; pass the --out folder of `sinkless distill`")
    tensors = load_file(str(student / "model.safetensors"))
    if "embeddings.register_tokens" not in tensors or tensors["embeddings.register_tokens"].shape[1] == 0:
        fail(f"{student} has no register tokens; pass the --out folder of `sinkless distill`")
    original = zoo.load(args.model).model.embeddings.position_embeddings.detach()
    trained = tensors["embeddings.position_embeddings"]
    if trained.shape != original.shape:
        fail(f"{student} was not distilled from {args.model} (position table {tuple(trained.shape)} vs "
             f"{tuple(original.shape)}); pass --model with the model it was distilled from")
    shutil.copytree(student, out / "original-positions")
    save_file({**tensors, "embeddings.position_embeddings": original.clone().contiguous()},
              str(out / "original-positions" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(student, out / "no-registers")
    config = json.loads((student / "config.json").read_text())
    (out / "no-registers" / "config.json").write_text(json.dumps({**config, "num_register_tokens": 0}, indent=2))
    save_file({**tensors, "embeddings.register_tokens": tensors["embeddings.register_tokens"][:, :0].contiguous()},
              str(out / "no-registers" / "model.safetensors"), metadata={"format": "pt"})
    return {"student": str(student), "model": args.model, "original_positions": str(out / "original-positions"),
            "no_registers": str(out / "no-registers"), "n_registers_dropped": int(tensors["embeddings.register_tokens"].shape[1]),
            "position_table_relative_change": float((trained - original).norm() / original.norm())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("init").add_argument("--json", required=True)
    ev = sub.add_parser("eval")
    ev.add_argument("student")
    ev.add_argument("--json", required=True)
    ce = sub.add_parser("ceiling")
    ce.add_argument("students", nargs="*")
    ce.add_argument("--json", required=True)
    fi = sub.add_parser("fit")
    fi.add_argument("students", nargs="+")
    fi.add_argument("--images", required=True)
    fi.add_argument("--every", type=int, default=4)
    fi.add_argument("--limit", type=int, default=10)
    fi.add_argument("--json", required=True)
    ab = sub.add_parser("ablate")
    ab.add_argument("student")
    ab.add_argument("out")
    ab.add_argument("--model", default="planted-vit", help="the model the student was distilled from")
    ab.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = {"init": init, "eval": evaluate, "ceiling": ceiling, "fit": fit, "ablate": ablate}[args.what](args)
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result if args.what != "eval" else {k: {kk: vv for kk, vv in v.items() if kk != "norms"} for k, v in result["sets"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
