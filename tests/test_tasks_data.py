"""Dataset readers on tiny files written here (VOC, COCO, folder + annotation file), the mini set, synthetic scenes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from sinkless.errors import SinklessError
from sinkless.tasks.data import IGNORE, mini_set, open_dataset, rasterize_polygons
from sinkless.tasks.voc_coco import read_coco, read_voc
from sinkless.tasks.synthetic import SHAPES, SceneSpec, render_scene, synthetic_scenes


def _image(path, size=(40, 30), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# -- Pascal VOC ----------------------------------------------------------------------------------
VOC_XML = """<annotation><filename>{name}.jpg</filename><size><width>40</width><height>30</height></size>
<object><name>cat</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>5</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>
<object><name>dog</name><difficult>1</difficult><bndbox><xmin>21</xmin><ymin>1</ymin><xmax>40</xmax><ymax>10</ymax></bndbox></object>
</annotation>"""


def _voc(root):
    for name in ("a", "b"):
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name))
        _image(root / "JPEGImages" / f"{name}.jpg")
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[4:25, 2:20] = 8  # cat
    mask[4, 2:20] = IGNORE  # VOC's object border
    seg = Image.fromarray(mask, mode="P")
    seg.putpalette([0, 0, 0] * 256)
    (root / "SegmentationClass").mkdir()
    seg.save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("b\n")


def test_voc_boxes_masks_and_split(tmp_path):
    _voc(tmp_path)
    data = open_dataset(tmp_path)
    assert data.kind == "voc" and data.names == ["a", "b"] and len(data) == 2
    a = data[0]
    # VOC's 1-based inclusive boxes become 0-based half-open; difficult boxes are kept
    assert a.boxes.tolist() == [[2, 4, 20, 25], [20, 0, 40, 10]]
    assert a.box_labels == ["cat", "dog"] and a.label == "cat"
    assert data.classes[8] == "cat" and a.mask[10, 10] == 8 and a.mask[4, 5] == IGNORE
    assert data[1].mask is None
    assert read_voc(tmp_path, split="trainval").names == ["b"]
    with pytest.raises(SinklessError, match="split file not found"):
        read_voc(tmp_path, split="test")


def test_voc_errors(tmp_path):
    _voc(tmp_path)
    (tmp_path / "Annotations" / "c.xml").write_text("<annotation><object><bndbox><xmin>x</xmin></bndbox></object>")
    with pytest.raises(SinklessError, match="cannot parse VOC annotation"):
        read_voc(tmp_path)
    (tmp_path / "Annotations" / "c.xml").write_text(VOC_XML.format(name="missing"))
    with pytest.raises(SinklessError, match="image not found"):
        read_voc(tmp_path)


# -- COCO ----------------------------------------------------------------------------------------
def _rle_string(counts):
    """COCO's compressed RLE encoding (the inverse of what the reader decodes)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_boxes_polygons_rle_and_crowds(tmp_path):
    _image(tmp_path / "val" / "one.jpg", (20, 10))
    # uncompressed RLE over a 10 x 20 image, column-major: column 0 rows 0-9 off, column 1 rows 0-4 on...
    column_major = np.zeros((10, 20), dtype=bool)
    column_major[2:6, 12:15] = True
    flat = column_major.T.reshape(-1)
    runs, value, count = [], False, 0
    for bit in flat:
        if bit != value:
            runs.append(count)
            value, count = bit, 0
        count += 1
    runs.append(count)
    coco = {
        "images": [{"id": 7, "file_name": "one.jpg", "width": 20, "height": 10}],
        "categories": [{"id": 3, "name": "cup"}, {"id": 1, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 4], "area": 20, "iscrowd": 0,
             "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]]},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [12, 2, 3, 4], "area": 12, "iscrowd": 0,
             "segmentation": {"size": [10, 20], "counts": _rle_string(runs)}},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [16, 0, 4, 10], "area": 40, "iscrowd": 1,
             "segmentation": {"size": [10, 20], "counts": [160, 40]}},
        ],
    }
    path = tmp_path / "annotations" / "instances_val.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    data = open_dataset(path)  # images found in ../val (COCO's layout)
    assert data.kind == "coco" and data.classes == ["background", "cat", "cup"]
    sample = data[0]
    assert sample.boxes.tolist() == [[1, 1, 6, 5], [12, 2, 15, 6]]  # crowds give no box; larger first
    assert sample.box_labels == ["cat", "cup"]
    expected = np.zeros((10, 20), dtype=np.uint8)
    expected[1:5, 1:6] = 1
    expected[2:6, 12:15] = 2
    expected[:, 16:20] = IGNORE
    assert np.array_equal(sample.mask, expected)


def test_coco_missing_image_and_bad_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": []}))
    with pytest.raises(SinklessError, match="image not found"):
        read_coco(path)
    path.write_text("{not json")
    with pytest.raises(SinklessError, match="not valid JSON"):
        open_dataset(path)


# -- folder + annotation file --------------------------------------------------------------------
def test_annotation_json_with_polygons_and_mask_png(tmp_path):
    _image(tmp_path / "one.png")
    _image(tmp_path / "two.png")
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[0:5, 0:5] = 2
    Image.fromarray(mask).save(tmp_path / "two_mask.png")
    (tmp_path / "annotations.json").write_text(json.dumps({
        "format": "sinkless-annotations", "version": 1, "classes": ["cat", "dog"],
        "images": [
            {"file": "one.png", "objects": [{"label": "dog", "polygons": [[[10, 10], [20, 10], [20, 20], [10, 20]]]}]},
            {"file": "two.png", "label": "dog", "objects": [{"label": "dog", "box": [0, 0, 5, 5]}], "mask": "two_mask.png"},
        ],
    }))
    data = open_dataset(tmp_path)
    assert data.kind == "folder" and data.classes == ["background", "cat", "dog"]
    one = data[0]
    assert one.boxes.tolist() == [[10, 10, 20, 20]]  # the polygon's tight box
    assert one.label == "dog" and one.mask.sum() == 2 * 100 and set(np.unique(one.mask)) == {0, 2}
    assert np.array_equal(data[1].mask, mask)


def test_polygons_cover_pixel_centres():
    mask = rasterize_polygons((6, 4), [(3, [[1, 1], [4, 1], [4, 3], [1, 3]])])
    assert mask.tolist() == [[0] * 6, [0, 3, 3, 3, 0, 0], [0, 3, 3, 3, 0, 0], [0] * 6]


def test_annotation_csv(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "annotations.csv").write_text("file,x0,y0,x1,y1,label\na.jpg,1,2,10,12,cup\na.jpg,20,2,30,12,cat\n")
    data = open_dataset(tmp_path / "annotations.csv")
    sample = data[0]
    assert sample.boxes.tolist() == [[1, 2, 10, 12], [20, 2, 30, 12]] and sample.mask is None
    assert data.classes == ["background", "cup", "cat"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not valid JSON"),
        ('{"images": 3}', 'an "images" list'),
        ('{"format": "voc", "images": []}', "is not 'sinkless-annotations'"),
        ('{"images": [{"objects": []}]}', 'needs a "file"'),
        ('{"images": [{"file": "a.jpg", "objects": [{"box": [5, 5, 1, 1]}]}]}', "empty or negative"),
        ('{"images": [{"file": "a.jpg", "objects": [{"box": [1, 2, "x"]}]}]}', "four numbers"),
        ('{"images": [{"file": "a.jpg", "objects": [{"polygons": [[[1, 2], [3, 4]]]}]}]}', "at least 3 points"),
        ('{"images": [{"file": "missing.jpg", "objects": []}]}', "image not found"),
    ],
)
def test_malformed_annotation_files(tmp_path, content, message):
    _image(tmp_path / "a.jpg")
    (tmp_path / "annotations.json").write_text(content)
    with pytest.raises(SinklessError, match=message):
        open_dataset(tmp_path)


def test_box_outside_image_and_corrupt_image(tmp_path):
    _image(tmp_path / "a.jpg", (40, 30))
    (tmp_path / "annotations.csv").write_text("file,x0,y0,x1,y1\na.jpg,0,0,80,10\n")
    with pytest.raises(SinklessError, match="reaches past"):
        open_dataset(tmp_path)[0]
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(SinklessError, match="cannot read"):
        open_dataset(tmp_path)[0]


def test_unknown_data(tmp_path):
    with pytest.raises(SinklessError, match="data not found"):
        open_dataset(tmp_path / "nothing")
    (tmp_path / "x.txt").write_text("?")
    with pytest.raises(SinklessError, match="cannot tell"):
        open_dataset(tmp_path / "x.txt")
    with pytest.raises(SinklessError, match="holds no annotations"):
        open_dataset(tmp_path)


# -- the shipped mini set ------------------------------------------------------------------------
def test_mini_set_ships_boxes_and_masks():
    data = mini_set()
    assert data.kind == "mini" and len(data) >= 8
    for sample in data:
        assert len(sample.boxes) >= 1 and sample.mask is not None and sample.label
        assert sample.mask.shape == (sample.image.height, sample.image.width)
        foreground = sample.mask > 0
        # every box holds mask pixels, and the mask lies inside the union of the boxes
        inside = np.zeros_like(foreground)
        for x0, y0, x1, y1 in sample.boxes.astype(int):
            assert foreground[y0:y1, x0:x1].any(), sample.name
            inside[y0:y1, x0:x1] = True
        assert not (foreground & ~inside).any(), sample.name


# -- synthetic scenes ----------------------------------------------------------------------------
def test_synthetic_boxes_and_masks_are_exact():
    spec = SceneSpec()
    for i in range(12):
        sample = render_scene(i, spec)
        assert sample.image.size == (spec.size, spec.size)
        assert 1 <= len(sample.boxes) <= spec.max_objects
        for box, label in zip(sample.boxes.astype(int), sample.box_labels):
            region = np.zeros_like(sample.mask, dtype=bool)
            ys, xs = np.nonzero(sample.mask == SHAPES.index(label) + 1)
            # the box is the tight box of the object's own mask pixels (objects never touch)
            inside = (xs >= box[0]) & (xs < box[2]) & (ys >= box[1]) & (ys < box[3])
            region[ys[inside], xs[inside]] = True
            rows, cols = np.nonzero(region)
            assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == box.tolist()


def test_synthetic_flat_background_is_one_colour_and_objects_differ():
    flat = next(s for s in (render_scene(i) for i in range(20)) if _is_flat(s))
    pixels = np.asarray(flat.image).reshape(-1, 3)
    background = pixels[flat.mask.reshape(-1) == 0]
    assert len(np.unique(background, axis=0)) == 1
    objects = pixels[flat.mask.reshape(-1) > 0]
    assert not (objects == background[0]).all(1).any()


def _is_flat(sample) -> bool:
    pixels = np.asarray(sample.image).reshape(-1, 3)[sample.mask.reshape(-1) == 0]
    return len(np.unique(pixels, axis=0)) == 1


def test_synthetic_scenes_are_deterministic_and_independent_of_n():
    a, b = synthetic_scenes(5), synthetic_scenes(3)
    for i in range(3):
        sa, sb = a[i], b[i]
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
        assert np.array_equal(sa.mask, sb.mask) and np.array_equal(sa.boxes, sb.boxes)
    assert len(synthetic_scenes()) == SceneSpec().n
    assert not np.array_equal(np.asarray(render_scene(0, SceneSpec(seed=1)).image), np.asarray(a[0].image))


def test_images_of_one_name_in_two_folders_get_distinct_names():
    import numpy as np
    from PIL import Image as PILImage

    from sinkless.tasks.dataset import Dataset, Sample

    def sample(name):
        return lambda: Sample(name, PILImage.new("RGB", (8, 8)), np.zeros((0, 4)))

    data = Dataset("d", "folder", ["x", "x", "x_2"], [sample("x"), sample("x"), sample("x_2")], ["background"])
    assert data.names == ["x", "x_3", "x_2"] and [s.name for s in data] == data.names
    assert data.limit(2).names == ["x", "x_3"]


def test_an_excel_csv_with_a_bom_and_spaced_header(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "annotations.csv").write_bytes("\ufefffile, x0, y0, x1, y1, label\r\na.jpg, 1, 2, 10, 12, cup\r\n".encode())
    data = open_dataset(tmp_path / "annotations.csv")
    assert data[0].boxes.tolist() == [[1, 2, 10, 12]] and data.classes == ["background", "cup"]


@pytest.mark.parametrize("content, message", [
    ("file,x0,y0,x1,y1,label\n", "lists no images"),
    ("file,x0,y0,x1\na.jpg,1,2,3\n", "the header has no y1 (it needs file, x0, y0, x1, y1"),
    ("file,x0,y0,x1,y1\n,1,2,10,12\n", "line 2: no file name"),
])
def test_csv_mistakes_name_themselves(tmp_path, content, message):
    _image(tmp_path / "a.jpg")
    (tmp_path / "annotations.csv").write_text(content)
    with pytest.raises(SinklessError, match=re.escape(message)):
        open_dataset(tmp_path / "annotations.csv")


def test_an_empty_file_entry_is_refused_when_the_file_is_read(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "annotations.json").write_text(json.dumps({"images": [{"file": "", "objects": [{"label": "a", "box": [1, 1, 5, 5]}]}]}))
    with pytest.raises(SinklessError, match="each image needs a \"file\""):
        open_dataset(tmp_path / "annotations.json")
