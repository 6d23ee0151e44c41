"""The bootstrap intervals of ``sinkless compare`` (sinkless.tasks.uncertainty): exact on the full sample, paired, honest."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from sinkless import cli, zoo
from sinkless.tasks import fixes, uncertainty
from sinkless.tasks.compare import compare
from sinkless.tasks.zeroseg import pixel_counts, scores_from_confusion


@pytest.fixture(scope="module")
def tiny():
    return zoo.load("planted-vit-tiny")


def _no_op(loaded, images):
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def compared(tiny):
    """Each task on 8 synthetic scenes, under none and a fix that changes nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fixes.FIXES, "noop", _no_op)
        return {task: compare(tiny, task, "synthetic", ["none", "noop"], limit=8, progress=False, overrides={"max_side": 112})[0]
                for task in ("lost", "zeroseg", "probe")}


@pytest.mark.parametrize("task", ["lost", "zeroseg", "probe"])
def test_the_summed_statistic_gives_the_reported_metric_exactly(compared, task):
    comparison = compared[task]
    for row in comparison.results:
        stats = uncertainty.statistics(task, row.per_image)
        assert stats is not None and stats.shape[0] == len(row.per_image)
        value = uncertainty.metric_of(task, stats.sum(0, keepdims=True), len(row.per_image))[0]
        assert value == pytest.approx(row.metrics[comparison.metric], abs=1e-9)
        low, high = row.uncertainty["ci95"]
        assert low <= row.metrics[comparison.metric] <= high


@pytest.mark.parametrize("task", ["lost", "zeroseg", "probe"])
def test_a_fix_that_changes_nothing_has_a_zero_difference_and_a_zero_interval(compared, task):
    none, noop = compared[task].results
    paired = noop.uncertainty["vs_none"]
    assert paired["delta"] == 0 and paired["ci95"] == [0, 0] and paired["verdict"] == "within the spread"
    assert paired["images_same"] == len(noop.per_image) and paired["images_better"] == paired["images_worse"] == 0
    assert "vs_none" not in none.uncertainty and none.uncertainty["ci95"] == noop.uncertainty["ci95"]
    row = noop.to_json()
    assert row["ci95"] == noop.uncertainty["ci95"] and row["vs_none"] == paired  # in the JSON rows


def test_the_pixel_counts_are_each_image_s_own_scores(compared):
    for record in compared["zeroseg"].results[0].per_image:
        counts = record["counts"]
        matrix = np.zeros((2, 2), dtype=np.int64)  # rebuild what the counts say of the 2-class confusion matrix
        for c, inter, truth, pred in zip(counts["class"], counts["intersection"], counts["truth"], counts["predicted"]):
            matrix[c, c] = inter
            matrix[c, 1 - c] = truth - inter
        assert [matrix[:, c].sum() for c in counts["class"]] == counts["predicted"]
        assert scores_from_confusion(matrix)["miou"] == pytest.approx(record["miou"])


def test_pixel_counts_keep_only_the_classes_an_image_has():
    matrix = np.array([[5, 1, 0, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 3, 0, 0]])  # class 2 absent; class 3 never predicted
    counts = pixel_counts(matrix)
    assert counts == {"class": [0, 1, 3], "intersection": [5, 4, 0], "truth": [6, 6, 3], "predicted": [7, 8, 0]}
    stats = uncertainty.statistics("probe", [{"counts": counts}])
    assert stats.shape == (1, 12)
    assert uncertainty.metric_of("probe", stats, 1)[0] == pytest.approx(scores_from_confusion(matrix)["miou"])


def _lost_rows(base_hits, fix_hits):
    def records(hits):
        return [{"name": f"i{n}", "hit": bool(h)} for n, h in enumerate(hits)]

    return [{"fix": "none", "corloc": 100.0 * np.mean(base_hits), "per_image": records(base_hits)},
            {"fix": "x", "corloc": 100.0 * np.mean(fix_hits), "per_image": records(fix_hits)}]


def test_pairing_narrows_the_interval_of_a_consistent_gain():
    # 20 images: the fix turns exactly the 4 misses among the first 10 into hits and changes nothing else
    base = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1] + [1, 0] * 5
    fixed = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1] + [1, 0] * 5
    out = uncertainty.annotate("lost", _lost_rows(base, fixed), "corloc")
    paired = out["x"]["vs_none"]
    assert paired["delta"] == pytest.approx(20.0) and (paired["images_better"], paired["images_worse"]) == (4, 0)
    low, high = paired["ci95"]
    assert 0 < low < 20 < high <= 40  # never below zero: no image got worse
    assert paired["verdict"] == "higher"
    reverse = uncertainty.annotate("lost", _lost_rows(fixed, base), "corloc")["x"]["vs_none"]
    assert reverse["verdict"] == "lower" and reverse["ci95"] == [-high, -low]  # the same draws, mirrored
    # the two rows' own intervals overlap widely: unpaired, the gain would not look sure
    assert out["none"]["ci95"][1] > out["x"]["ci95"][0]


def test_a_mixed_change_has_an_interval_around_zero_and_the_same_draws_each_time():
    base = [1, 0] * 8
    fixed = [0, 1] * 8  # every image changes, half up and half down
    first = uncertainty.annotate("lost", _lost_rows(base, fixed), "corloc")["x"]["vs_none"]
    assert first["delta"] == 0 and first["ci95"][0] < 0 < first["ci95"][1] and first["verdict"] == "within the spread"
    assert (first["images_better"], first["images_worse"], first["images_same"]) == (8, 8, 0)
    assert uncertainty.annotate("lost", _lost_rows(base, fixed), "corloc")["x"]["vs_none"] == first  # seeded
    other = uncertainty.annotate("lost", _lost_rows(base, fixed), "corloc", seed=1)["x"]["vs_none"]
    assert other["seed"] == 1


def test_rows_it_cannot_pair_or_score_get_what_can_be_said():
    rows = _lost_rows([1, 0, 1, 0], [1, 1, 1, 0])
    rows[1]["per_image"][0]["name"] = "another image"
    out = uncertainty.annotate("lost", rows, "corloc")
    assert "ci95" in out["x"] and "vs_none" not in out["x"]  # not the same images: no paired interval
    old = [{"fix": "none", "miou": 50.0, "per_image": [{"name": "a", "miou": 50.0}]}]  # a record written before the counts
    assert uncertainty.annotate("zeroseg", old, "miou") == {}
    assert uncertainty.annotate("lost", [{"fix": "x", "corloc": 50.0, "per_image": _lost_rows([1, 0], [1, 0])[0]["per_image"]}],
                                "corloc")["x"].keys() == {"ci95"}  # no none row: its own interval only


def test_rows_naming_different_classes_are_laid_out_alike():
    # one row's images never show class 2, the other's predict it once: both are laid out over classes 0-2
    a = [{"name": "x", "miou": 0, "counts": {"class": [0, 1], "intersection": [5, 4], "truth": [6, 6], "predicted": [7, 5]}}]
    b = [{"name": "x", "miou": 0, "counts": {"class": [0, 1, 2], "intersection": [5, 4], "truth": [6, 6, 0], "predicted": [6, 5, 1]}}]
    b[0]["counts"]["intersection"].append(0)
    versus = uncertainty.paired("probe", {"miou": 1.0, "per_image": b}, {"miou": 2.0, "per_image": a}, "miou")
    assert versus is not None and versus["ci95"][0] == versus["ci95"][1]  # one image: every resample is that image


def test_the_cli_table_shows_the_interval_and_the_json_carries_it(tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "6", "--task", "probe",
                     "--fix", "none", "--fix", "ttr", "--json", str(out)])
    table = capsys.readouterr().out
    assert code == 0
    assert "95% CI" in table and "bootstrap over the images" in table
    rows = json.loads(out.read_text())["results"]
    ttr = next(r for r in rows if r["fix"] == "ttr")
    low, high = ttr["vs_none"]["ci95"]
    assert f"[{low:+.1f}, {high:+.1f}]" in table
    assert all(set(record["counts"]) == {"class", "intersection", "truth", "predicted"} for record in ttr["per_image"])


def test_rows_of_two_models_on_the_same_images_pair(tiny):
    """A model and its clean twin, each from its own compare (two JSON files): `paired` gives their difference."""
    planted, _ = compare(tiny, "zeroseg", "synthetic", ["none"], limit=6, progress=False, overrides={"max_side": 112})
    clean, _ = compare(zoo.load("planted-vit-tiny-clean"), "zeroseg", "synthetic", ["none"], limit=6, progress=False,
                       overrides={"max_side": 112})
    row, base = clean.results[0].to_json(), planted.results[0].to_json()
    versus = uncertainty.paired("zeroseg", row, base, "miou")
    assert versus["delta"] == pytest.approx(row["miou"] - base["miou"], abs=1e-3)
    assert versus["ci95"][0] <= versus["delta"] <= versus["ci95"][1]
    assert versus["images_better"] + versus["images_worse"] + versus["images_same"] == 6
    assert uncertainty.paired("zeroseg", row, {**base, "per_image": base["per_image"][:5]}, "miou") is None  # other images


def test_resamples_sets_the_draws_and_zero_switches_the_intervals_off(tmp_path, capsys, tiny):
    comparison, _ = compare(tiny, "lost", "synthetic", ["none"], limit=4, progress=False, overrides={"max_side": 112}, resamples=0)
    assert comparison.results[0].uncertainty == {} and "ci95" not in comparison.results[0].to_json()
    out = tmp_path / "lost.json"
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--limit", "4", "--task", "lost",
                     "--fix", "none", "--fix", "ttr", "--resamples", "50", "--json", str(out)])
    assert code == 0 and "95% CI" in capsys.readouterr().out
    ttr = json.loads(out.read_text())["results"][1]
    assert ttr["vs_none"]["resamples"] == 50
    code = cli.main(["compare", "--model", "planted-vit-tiny", "--data", "synthetic", "--task", "lost", "--resamples", "-1",
                     "--json", str(tmp_path / "bad.json")])
    assert code == 2 and "--resamples" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
