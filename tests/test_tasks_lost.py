"""LOST against results computed by hand on tiny feature maps: degree, seed, expansion, 4-connected box."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkless.tasks.lost import box_iou, component, lost

# A 3x4 grid of 2-D features (row-major patch indices 0..11):
#   b b b b        b = (1, 0)      background
#   b o o g        o = (-1, 1)     object
#   b b b o2       o2 = (-1, 2)    object, brighter
#                  g = (4, 4.5)    a "bridge" patch positively correlated with everything
# Gram entries: b·b=1 b·o=-1 b·o2=-1 b·g=4 | o·o=2 o·o2=3 o·g=0.5 | o2·o2=5 o2·g=5 | g·g=36.25
B, O, O2, G = (1.0, 0.0), (-1.0, 1.0), (-1.0, 2.0), (4.0, 4.5)
GRID = (3, 4)
FEATURES = torch.tensor([B, B, B, B, B, O, O, G, B, B, B, O2])


def test_degree_and_seed_with_deterministic_ties():
    result = lost(FEATURES, GRID)
    # b rows: 8 b + g = 9; o rows: o, o, o2, g = 4; o2 row: 4; g row: all 12
    assert result.degree.tolist() == [9, 9, 9, 9, 9, 4, 4, 12, 9, 9, 9, 4]
    assert result.seed == 5  # patches 5, 6 and 11 tie at degree 4: the lowest index wins
    assert result.candidates == [5, 6, 11, 0, 1, 2, 3, 4, 8, 9, 10, 7]  # stable order of degrees


def test_expansion_limited_to_k_lowest_degrees():
    small = lost(FEATURES, GRID, k=3)
    assert small.expansion == [5, 6, 11]  # all three correlate positively with the seed
    # M = rows 5 + 6 + 11: b columns -1-1-1 = -3, o 2+2+3 = 7, o2 3+3+5 = 11, g 0.5+0.5+5 = 6
    assert small.score.view(GRID)[0].tolist() == [-3.0] * 4
    assert small.score[[5, 6, 7, 11]].tolist() == [7.0, 7.0, 6.0, 11.0]
    # M > 0 on 5, 6, 7, 11, a 4-connected chain: rows 1-2, columns 1-3
    assert small.mask.nonzero().tolist() == [[1, 1], [1, 2], [1, 3], [2, 3]]
    assert small.box == (1, 1, 4, 3)

    full = lost(FEATURES, GRID, k=100)
    assert full.expansion == [5, 6, 11, 7]  # g joins (A[5, 7] = 0.5 > 0); b patches do not (-1)
    # adding g's row turns the background positive (-3 + 4 = 1): the whole grid is one component
    assert full.score[0].item() == 1.0
    assert full.box == (0, 0, 4, 3)


def test_expansion_takes_exactly_k_candidates():
    # k = 2: candidates 5, 6 (11, the third lowest degree, correlates positively with the seed but is not one)
    two = lost(FEATURES, GRID, k=2)
    assert two.candidates == [5, 6] and two.expansion == [5, 6]
    # M = rows 5 + 6: b -2, o 2 + 2 = 4, g 0.5 + 0.5 = 1, o2 3 + 3 = 6 (with row 11 it would be 11)
    assert two.score[[0, 5, 7, 11]].tolist() == [-2.0, 4.0, 1.0, 6.0]
    one = lost(FEATURES, GRID, k=1)
    assert one.candidates == [5] and one.expansion == [5]
    assert one.score.tolist() == FEATURES.double().matmul(FEATURES.double()[5]).tolist()


def test_four_connectivity_excludes_diagonals():
    positive = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    assert component(positive, 4).nonzero().tolist() == [[1, 1], [1, 2], [2, 2]]
    assert component(positive, 0).nonzero().tolist() == [[0, 0]]  # only diagonal neighbours
    # a seed that is not positive is a component of its own
    assert component(positive, 1).nonzero().tolist() == [[0, 1]]


def test_isolated_object_patches_are_not_joined():
    b, o = (1.0, 0.0), (-1.0, 1.0)
    features = torch.tensor([b, b, b, b, o, o, b, b, b, b, b, o])  # object at (1,0)-(1,1) and a lone one at (2,3)
    result = lost(features, GRID)
    assert result.seed == 4
    assert result.expansion == [4, 5, 11]
    assert result.box == (0, 1, 2, 2)


def test_gram_bias_and_l2():
    same = torch.tensor([[1.0, 0.0]] * 12)
    # bias -2 makes every entry negative: degree 0 everywhere, seed 0, nothing expands, box = the seed
    result = lost(same, GRID, gram_bias=-2.0)
    assert result.degree.tolist() == [0] * 12
    assert result.expansion == [] and result.box == (0, 0, 1, 1)
    # L2 normalisation: rescaling rows changes nothing
    scaled = FEATURES * torch.arange(1, 13, dtype=torch.float32)[:, None]
    assert lost(scaled, GRID, l2=True).box == lost(FEATURES, GRID, l2=True).box
    assert lost(scaled, GRID, l2=True).degree.tolist() == lost(FEATURES, GRID, l2=True).degree.tolist()


def test_median_bias_subtracts_the_median_entry():
    # A for [b, b, o, o] (b = (1, 0), o = (-1, 1)): entries -1 (x8), 1 (x4), 2 (x4); median (the lower
    # middle one) = -1, so A + 1: b·o = 0 is no longer positive and each patch has degree 2
    features = torch.tensor([B, B, O, O])
    result = lost(features, (2, 2), gram_bias="median")
    assert result.degree.tolist() == [2, 2, 2, 2]
    shifted = lost(features, (2, 2), gram_bias=1.0)
    assert torch.equal(result.score, shifted.score) and result.box == shifted.box


def test_box_iou_by_hand():
    box = np.array([0.0, 0.0, 10.0, 10.0])
    truth = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=float)
    assert box_iou(box, truth) == pytest.approx([1.0, 25 / 175, 0.0, 0.5])


def test_pixel_box_is_clipped_to_the_image(monkeypatch):
    """evaluate() maps the patch box to pixels and clips it to the resized image (before padding)."""
    from types import SimpleNamespace

    from sinkless.tasks import lost as lost_module
    from sinkless.tasks.data import Dataset, Sample
    from sinkless.tasks._features import Extracted, Prepared
    from sinkless.adapters import TokenLayout
    from PIL import Image

    image = Image.new("RGB", (38, 25))  # padded to 40 x 30 with 10 px patches: a 3 x 4 grid
    prepared = Prepared(torch.zeros(1, 3, 30, 40), (25, 38), 1.0)
    monkeypatch.setattr(lost_module, "prepare", lambda *a, **k: prepared)
    monkeypatch.setattr(lost_module, "extract", lambda *a, **k: Extracted(TokenLayout(13, 1, 0, GRID), features=FEATURES))
    monkeypatch.setattr(lost_module, "check_vision", lambda *a: None)
    monkeypatch.setattr(lost_module, "resolve_layer", lambda loaded, layer: 0)
    loaded = SimpleNamespace(adapter=SimpleNamespace(patch_size=lambda model: 10), model=None)
    truth = np.array([[10.0, 10.0, 38.0, 25.0]])
    data = Dataset("hand", "folder", ["one"], [lambda: Sample("one", image, truth, ["o"])], ["background", "o"])
    score = lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3), progress=False)
    # patch box (1, 1, 4, 3) -> pixels (10, 10, 40, 30) -> clipped to the 38 x 25 image
    assert score.per_image[0]["box"] == [10.0, 10.0, 38.0, 25.0]
    assert score.per_image[0]["iou"] == 1.0 and score.corloc == 100.0


def test_box_iou_of_boxes_apart_on_one_axis_or_touching():
    box = np.array([0.0, 0.0, 10.0, 10.0])
    # apart in x only, apart in y only, touching on an edge: no overlap, whatever the other axis does
    others = np.array([[20, 0, 30, 10], [0, 20, 10, 30], [10, 0, 20, 10], [0, 10, 10, 20]], dtype=float)
    assert box_iou(box, others).tolist() == [0.0, 0.0, 0.0, 0.0]
    # boxes that do not start at the origin, and areas below one pixel
    assert box_iou(np.array([2.0, 6.0, 6.0, 8.0]), np.array([4, 6, 8, 8], dtype=float)) == pytest.approx([4 / 12])
    assert box_iou(np.array([0.0, 0.0, 0.5, 0.5]), [[0.0, 0.0, 0.5, 0.5]]) == pytest.approx([1.0])
    assert box_iou(np.array([1.0, 2.0, 3.0, 5.0]), [1, 2, 3, 5]).shape == (1,)  # one box given flat


def test_default_k_is_the_papers_100():
    same = torch.tensor([[1.0, 1.0]] * 121)  # 11 x 11 patches, all alike: every degree 121, ties by index
    result = lost(same, (11, 11))
    assert result.candidates == list(range(100)) and result.expansion == list(range(100))
    assert result.score.tolist() == [200.0] * 121 and result.box == (0, 0, 11, 11)


def test_expansion_needs_a_strictly_positive_correlation_with_the_seed():
    s, z, b = (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)  # s . z = 0
    result = lost(torch.tensor([s, z, b, b]), (2, 2), k=2)
    assert result.degree.tolist() == [3, 3, 4, 4] and result.candidates == [0, 1]
    assert result.expansion == [0]  # z is a candidate but not positively correlated with the seed


def test_l2_normalised_scores_are_sums_of_cosines():
    result = lost(FEATURES, GRID, k=3, l2=True)
    assert result.expansion == [5, 6, 11]
    # background column: cos(b, o) twice and cos(b, o2) once
    assert result.score[0].item() == pytest.approx(-2 / 2**0.5 - 1 / 5**0.5)
    assert result.score[5].item() == pytest.approx(1 + 1 + 3 / (2**0.5 * 5**0.5))


def test_component_grows_in_every_direction_from_the_seed():
    column = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert component(column, 10).nonzero().tolist() == [[0, 1], [1, 1], [2, 1], [3, 0], [3, 1], [3, 2]]
    assert component(column, 1).sum() == 6 and component(column, 9).sum() == 6
    assert component(column, 0).dtype == torch.bool


def _fake_evaluation(monkeypatch, samples, scale=0.5):
    """evaluate() on hand-made features: images of 76 x 50 shown at half size (38 x 25), a 3 x 4 grid of
    10 px patches (20 px in the image); each fake checks it is handed the sample, the model and the prepared input."""
    from types import SimpleNamespace

    from sinkless.adapters import TokenLayout
    from sinkless.tasks import lost as lost_module
    from sinkless.tasks._features import Extracted, Prepared

    from sinkless.tasks.data import Dataset

    calls = []
    model = object()
    loaded = SimpleNamespace(adapter=SimpleNamespace(patch_size=lambda m: 10 if m is model else None), model=model)
    prepared = Prepared(torch.zeros(1, 3, 30, 40), (25, 38), scale)
    images = {id(s.image) for s in samples}

    def prepare(image, got, max_side):
        assert id(image) in images and got is loaded
        calls.append(("prepare", max_side))
        return prepared

    def extract(got, prep, *, layer, features):
        assert got is loaded and prep is prepared
        calls.append(("extract", layer, features))
        return Extracted(TokenLayout(13, 1, 0, GRID), features=FEATURES)

    monkeypatch.setattr(lost_module, "prepare", prepare)
    monkeypatch.setattr(lost_module, "extract", extract)
    monkeypatch.setattr(lost_module, "check_vision", lambda *a: calls.append(("check", a)))
    monkeypatch.setattr(lost_module, "resolve_layer", lambda got, layer: calls.append(("layer", got is loaded, layer)) or 7)
    data = Dataset("hand", "folder", [s.name for s in samples], [lambda s=s: s for s in samples], ["background", "o"])
    return lost_module, loaded, data, calls


def test_evaluate_scores_hits_and_misses_and_passes_the_protocol_on(monkeypatch):
    from PIL import Image

    from sinkless.tasks.data import Sample

    image = Image.new("RGB", (76, 50))
    # the predicted box, patches (1, 1, 4, 3), is (10, 10, 38, 25) at half size, (20, 20, 76, 50) in the image
    hit = Sample("hit", image, np.array([[20.0, 20.0, 76.0, 50.0]]), ["o"])
    half = Sample("half", image, np.array([[20.0, 20.0, 76.0, 35.0], [0.0, 0.0, 4.0, 4.0]]), ["o", "o"])  # IoU exactly 0.5
    near = Sample("near", image, np.array([[20.0, 20.0, 76.0, 34.0]]), ["o"])  # IoU 14/30
    miss = Sample("miss", image, np.array([[0.0, 0.0, 16.0, 16.0]]), ["o"])
    empty = Sample("empty", image, np.zeros((0, 4)), [])
    lost_module, loaded, data, calls = _fake_evaluation(monkeypatch, [hit, empty, half, near, miss])
    protocol = lost_module.LostProtocol(k=3, layer=-2, features="queries", max_side=64)
    score = lost_module.evaluate(loaded, data, protocol, progress=False)
    assert score.n_images == 4 and score.corloc == 50.0 and score.metrics() == {"corloc": 50.0}
    assert score.per_image[0] == {"name": "hit", "box": [20.0, 20.0, 76.0, 50.0], "iou": 1.0, "hit": True, "seed": (1, 1), "expansion": 3}
    assert [(r["name"], r["iou"], r["hit"]) for r in score.per_image[1:]] == [("half", 0.5, True), ("near", 0.4667, False), ("miss", 0.0, False)]
    assert score.visuals == {}
    assert ("check", (loaded, "lost")) in calls and ("layer", True, -2) in calls
    assert calls.count(("prepare", 64)) == 4 and calls.count(("extract", 7, "queries")) == 4


def test_evaluate_hands_gram_bias_k_and_l2_to_lost(monkeypatch):
    from PIL import Image

    from sinkless.tasks.data import Sample

    sample = Sample("s", Image.new("RGB", (76, 50)), np.array([[20.0, 20.0, 76.0, 50.0]]), ["o"])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [sample])
    for k, bias, l2 in ((1, 0.0, False), (100, "median", False), (2, -0.75, True), (100, 0.0, True)):
        direct = lost(FEATURES, GRID, k=k, gram_bias=bias, l2=l2)
        record = lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=k, gram_bias=bias, l2=l2), progress=False).per_image[0]
        assert record["expansion"] == len(direct.expansion) and record["seed"] == divmod(direct.seed, 4)
        x0, y0, x1, y1 = direct.box
        assert record["box"] == [x0 * 20.0, y0 * 20.0, min(x1 * 20.0, 76.0), min(y1 * 20.0, 50.0)]
    assert lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=100), progress=False).per_image[0]["expansion"] == 4


def test_evaluate_draws_truth_prediction_and_seed(monkeypatch):
    from PIL import Image

    from sinkless.tasks.data import Sample

    image = Image.new("RGB", (76, 50))
    miss = Sample("miss", image, np.array([[0.0, 0.0, 16.0, 16.0]]), ["o"])
    hit = Sample("hit", image, np.array([[20.0, 20.0, 76.0, 50.0]]), ["o"])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [miss, hit])
    score = lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3), progress=False, visuals=True)
    picture = score.visuals["miss"]
    assert picture.size == (76, 50) and picture.mode == "RGB"
    assert picture.getpixel((0, 8)) == (0, 220, 0)  # ground truth: green outline
    assert picture.getpixel((75, 45)) == (255, 40, 40)  # a missed prediction: red outline, in image pixels
    assert picture.getpixel((30, 30)) == (255, 220, 0)  # the seed patch (row 1, col 1 = 20..40 px): yellow
    assert picture.getpixel((41, 30)) == (0, 0, 0) and picture.getpixel((60, 10)) == (0, 0, 0) and picture.getpixel((8, 8)) == (0, 0, 0)
    assert score.visuals["hit"].getpixel((75, 45)) == (40, 90, 255)  # a hit: blue
    assert image.getpixel((30, 30)) == (0, 0, 0)  # the input image is not drawn on
    gray = Sample("gray", Image.new("L", (76, 50)), np.array([[0.0, 0.0, 16.0, 16.0]]), ["o"])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [gray])
    drawn = lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3), progress=False, visuals=True).visuals["gray"]
    assert drawn.mode == "RGB" and drawn.getpixel((30, 30)) == (255, 220, 0)


def _outline(picture: np.ndarray, box, colour, width=3) -> None:
    """Paint the ``width``-pixel inner border of the half-open box (x0, y0, x1, y1) by hand."""
    x0, y0, x1, y1 = box
    inner = np.zeros(picture.shape[:2], dtype=bool)
    inner[y0:y1, x0:x1] = True
    inner[y0 + width : y1 - width, x0 + width : x1 - width] = False
    picture[inner] = colour


def test_evaluate_picture_pixel_for_pixel(monkeypatch):
    from PIL import Image

    from sinkless.tasks.data import Sample

    sample = Sample("miss", Image.new("RGB", (76, 50)), np.array([[0.0, 0.0, 16.0, 16.0], [30.0, 2.0, 50.0, 12.0]]), ["o", "o"])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [sample])
    drawn = np.asarray(lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3), progress=False, visuals=True).visuals["miss"])
    expected = np.zeros((50, 76, 3), dtype=np.uint8)
    _outline(expected, (0, 0, 16, 16), (0, 220, 0))  # ground truth, green
    _outline(expected, (30, 2, 50, 12), (0, 220, 0))
    _outline(expected, (20, 20, 76, 50), (255, 40, 40))  # the (missed) prediction, red
    expected[20:40, 20:40] = (255, 220, 0)  # the seed patch (row 1, col 1), exactly one 20 px cell, yellow
    assert np.array_equal(drawn, expected), np.argwhere((drawn != expected).any(-1))[:5]


def test_evaluate_progress_bar_only_when_asked(monkeypatch, capsys):
    from PIL import Image

    from sinkless.tasks.data import Sample

    sample = Sample("s", Image.new("RGB", (76, 50)), np.array([[20.0, 20.0, 76.0, 50.0]]), ["o"])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [sample])
    lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3), progress=False)
    assert capsys.readouterr().err == ""
    lost_module.evaluate(loaded, data, lost_module.LostProtocol(k=3))
    err = capsys.readouterr().err
    assert "lost:   0%" in err and "0/1" in err and err.endswith("\r")  # a bar that clears itself (leave=False)


@pytest.mark.parametrize(
    "protocol, message",
    [
        (dict(features="logits"), "unknown features 'logits'\n  fix: choose one of keys, queries, values, tokens"),
        (dict(gram_bias="mean"), "--gram-bias must be a number or 'median', got 'mean'\n  fix: e.g. --gram-bias -0.5 or --gram-bias median"),
        (dict(k=0), "LOST needs k >= 1, got 0\n  fix: pass --k 100 (the paper's value)"),
    ],
)
def test_evaluate_refuses_bad_protocols(monkeypatch, protocol, message):
    from PIL import Image

    from sinkless.errors import SinklessError
    from sinkless.tasks.data import Sample

    sample = Sample("s", Image.new("RGB", (76, 50)), np.array([[0.0, 0.0, 8.0, 8.0]]), ["o"])
    lost_module, loaded, data, calls = _fake_evaluation(monkeypatch, [sample])
    with pytest.raises(SinklessError) as error:
        lost_module.evaluate(loaded, data, lost_module.LostProtocol(**protocol), progress=False)
    assert str(error.value) == message and not [c for c in calls if c[0] == "extract"]


def test_evaluate_without_any_box_is_an_error(monkeypatch):
    from PIL import Image

    from sinkless.errors import SinklessError
    from sinkless.tasks.data import Sample

    sample = Sample("s", Image.new("RGB", (76, 50)), np.zeros((0, 4)), [])
    lost_module, loaded, data, _ = _fake_evaluation(monkeypatch, [sample])
    with pytest.raises(SinklessError) as error:
        lost_module.evaluate(loaded, data, progress=False)
    assert str(error.value) == "no image of hand has a box, so LOST cannot be scored\n  fix: use data with object boxes"


def test_component_steps_one_patch_at_a_time():
    up = torch.tensor([[1], [1], [0], [1]], dtype=torch.bool)
    assert component(up, 1).nonzero().tolist() == [[0, 0], [1, 0]]  # up one, never across the gap
    assert component(up, 3).nonzero().tolist() == [[3, 0]]


def test_a_downscaled_image_keeps_truth_and_prediction_in_one_frame():
    """900 x 600 at max_side 224 is 224 x 149 (a rounded side): the box is scaled per axis, so a whole-image box stays
    inside the image (was y1 600.7: truth scaled by 448/900 against a prediction clipped to 299 px)."""
    import numpy as np
    from PIL import Image as PILImage

    from sinkless.tasks.compare import compare
    from sinkless.tasks.dataset import Dataset, Sample

    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (600, 900, 3), dtype=np.uint8))
    data = Dataset("big", "folder", ["big"], [lambda: Sample("big", image, np.asarray([[0.0, 0.0, 900.0, 600.0]]))], ["background", "x"])
    comparison, _ = compare("planted-vit-tiny", "lost", data, ["none"], progress=False, resamples=0, overrides={"max_side": 224})
    box = comparison.results[0].per_image[0]["box"]  # 224 x 149.3 -> 149 px
    assert 0 <= box[0] <= box[2] <= 900 and 0 <= box[1] <= box[3] <= 600
