"""``fusion submit`` refuses, before fusing anything, a filename template with a field other than
``{clip_id}`` (before: ``{x}`` escaped as a KeyError traceback from the first row) and an output
path that is the store or a file inside it (before: ``--out store.h5`` replaced the store by a CSV)."""
from __future__ import annotations

import json
import shutil

import pytest

from featurestore import open_store
from fusion.cli import main
from fusion.submission import check_filename_template


@pytest.mark.parametrize("template", ["{clip_id}{x}", "{clip_id}{", "{clip_id:d}", "{clip_id.upper}", "{}", "x.wav"])
def test_a_template_with_another_field_is_refused_naming_it(template):
    with pytest.raises(ValueError, match="filename template") as caught:
        check_filename_template(template)
    assert repr(template) in str(caught.value)


def test_templates_with_only_clip_id_pass():
    for template in ("audio/{clip_id}.wav", "{clip_id}.wav", "{{{clip_id}}}"):
        check_filename_template(template)


@pytest.fixture()
def recipe(tmp_path, paper_recipe_dict):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(paper_recipe_dict))
    return str(path)


def test_submit_with_a_bad_template_is_one_line_and_writes_nothing(tiny_store_path, recipe, tmp_path, capsys):
    out = tmp_path / "s.csv"
    code = main(["submit", "--store", str(tiny_store_path), "--recipe", recipe, "--split", "fold1_test",
                 "--out", str(out), "--filename-template", "{clip_id}{x}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'{clip_id}{x}'" in err and not out.exists()


def test_submit_into_the_store_is_refused_and_the_store_still_opens(tiny_store_path, recipe, tmp_path, capsys):
    store = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_store_path, store)
    for out in (store / "zarr.json", store / "index" / "s.csv"):
        code = main(["submit", "--store", str(store), "--recipe", recipe, "--split", "fold1_test", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "inside the store" in err
    for out in (store, store / "report"):
        assert main(["report", "--store", str(store), "--recipe", recipe, "--out", str(out)]) == 2
        assert "report directory" in capsys.readouterr().err
    with open_store(store) as opened:
        assert opened.n_clips > 0 and not (store / "index" / "s.csv").exists() and not (store / "report").exists()
        assert not (store / "report.md").exists()


def test_fusion_classify_refuses_a_run_directory_holding_other_weights_than_the_stored_run(tiny_store):
    """A run trained again since ``heads predict`` (same features and classes, other weights) would
    give the new files other probabilities than the stored ones: refused naming both sha256s."""
    from fusion.classify import ClassifyError, read_answer

    classes = list(tiny_store.classes)
    answer = {"classes": classes, "features": {"f": "fp"}, "weights": "best", "weights_sha256": "b" * 64,
              "errors": {}, "clips": [{"clip": "new", "segment_probs": [[1 / len(classes)] * len(classes)]}]}
    attrs = {"features": {"f": "fp"}, "weights_sha256": "a" * 64}
    with pytest.raises(ClassifyError, match=r"runs/c04 now holds other best weights \(sha256 bbbbbbbbbbbb...\) "
                                            r"than the ones predictions/C04 were made with \(aaaaaaaaaaaa...\)"):
        read_answer("C04", "runs/c04", attrs, answer, classes)
    assert read_answer("C04", "runs/c04", {**attrs, "weights_sha256": "b" * 64}, answer, classes).run == "C04"


def test_an_output_with_an_audio_or_video_name_is_refused(tmp_path):
    from fusion.submission import check_output_file

    for name in ("a.wav", "clip.MP4"):
        with pytest.raises(ValueError, match="names an audio or video file"):
            check_output_file(tmp_path / name)
    assert check_output_file(tmp_path / "a.csv") == tmp_path / "a.csv"
