"""``fusion classify``: a recipe fused on files equals what ``fusion`` computes for those clips from the store.

The runs are trained in a child process (started warm, :mod:`tests.warm_child`) and asked by ``python -m
heads`` children, as ``fusion classify`` itself asks them: fusion (and its tests) never import heads. Those
children start warm too (``warm_child.SubprocessModule`` in place of ``fusion.classify``'s ``subprocess``):
the command line is fusion's own; a cold start cost ~5 s of CPU each (torch, timm), most of this file.
"""
from __future__ import annotations

import json
import shutil
import textwrap
import warnings

import numpy as np
import pytest

from featurestore import open_store
import fusion.classify
from fusion.classify import ClassifyError, classify_files
from fusion.cli import main
from fusion.pipeline import fuse
from fusion.recipe import FusionRecipe

from tests import warm_child
from tests.heads._extracted import VIDEO_SET, extracted_store, files_of

TRAIN = textwrap.dedent("""
    import sys, torch, heads
    torch.set_num_threads(1)
    store, tmp = sys.argv[1], sys.argv[2]
    common = dict(store=store, train_split="fold1_train", val_split=None, device="cpu", progress=False, batch_size=4)
    for name, cfg in {{
        "V01": heads.TrainConfig(head="embedding_mlp", features=["{video}"], epochs=2, **common),
        "A01": heads.TrainConfig(head="spectrogram_cnn", features=["logmel"], head_config={{"backbone": "test_resnet"}},
                                 epochs=1, max_steps_per_epoch=2, **common),
    }}.items():
        cfg.out = f"{{tmp}}/{{name}}"
        heads.train(cfg)
        heads.predict(store, cfg.out, name=name, device="cpu", progress=False)
""").format(video=VIDEO_SET)

RECIPE = {  # every step that fits on the store: replacement, confidence weights, calibration, eq. (1)
    "name": "AV-tiny",
    "families": {"A04": ["A01"], "V04": ["V01"]},
    "replacement": {"source": "A04", "targets": ["V04"], "margin": 0.05},
    "class_weights": {"select": {"A04": ["bus", "park", "tram"]}, "confidence_fit_split": "fold1_train"},
    "calibration": {"method": "temperature", "fit_split": "fold1_train"},
    "postprocess": {"method": "eq1"},
}


@pytest.fixture(scope="module", autouse=True)
def warm_heads_children():
    """``fusion classify`` runs its ``[sys.executable, "-m", "heads", "classify", ...]`` children warm."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusion.classify, "subprocess", warm_child.SubprocessModule)
        yield


@pytest.fixture(scope="module")
def fused_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion_classify")
    root, store = extracted_store(tmp)
    trained = warm_child.run(["-c", TRAIN, str(store), str(tmp)])  # (heads is imported by the child only)
    assert trained.returncode == 0, trained.stderr[-3000:]
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    return {"root": root, "store": store, "recipe": recipe, "tmp": tmp}


def test_fusion_classify_of_files_equals_the_fusion_of_those_clips_from_the_store(fused_store, capsys):
    with open_store(fused_store["store"]) as store:
        ids = store.select(split="fold1_evaluate")[:5]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # calibration fitted on the runs' training split (a test shortcut)
            expected = fuse(store, FusionRecipe.from_json(fused_store["recipe"]), clip_ids=ids).final
    out = fused_store["tmp"] / "fused.csv"
    files = [str(f) for f in files_of(fused_store["root"], ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["classify", "--store", str(fused_store["store"]), "--recipe", str(fused_store["recipe"]),
                     *files, "--device", "cpu", "--json", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert [c["clip"] for c in answer["clips"]] == ids and not answer["errors"]
    np.testing.assert_allclose([c["probs"] for c in answer["clips"]], expected, rtol=0, atol=1e-6)
    assert set(answer["runs"]) == {"A01", "V01"} and answer["random_weights"]["V01"] == [VIDEO_SET]
    assert answer["calibration"]["method"] == "temperature" and answer["calibration"]["fit_split"] == "fold1_train"
    assert "fusion classify: run V01" in captured.err and "fusion classify: 5 clip(s) fused" in captured.err
    assert out.read_text().splitlines()[0].startswith("clip,files,top_class,probability,airport,")


def test_errors_name_the_run_the_file_and_the_feature_set(fused_store, tmp_path):
    with open_store(fused_store["store"]) as store:
        recipe = FusionRecipe.from_json(fused_store["recipe"])
        cid = store.clip_ids[0]
        mp4, = files_of(fused_store["root"], [cid], audio=False)
        with pytest.raises(ClassifyError) as refused:  # the audio run's heads classify refuses the clip
            classify_files(store, recipe, [mp4], device="cpu", progress=False)
        message = str(refused.value)
        assert message.startswith("run 'A01' (") and "\n" not in message and str(mp4) in message
        assert "heads classify: error:" in message and "feature set 'logmel'" in message
        assert "needs an audio file" in message
        moved = tmp_path / "moved"
        with pytest.raises(ClassifyError, match="--run-dir A01=PATH"):
            classify_files(store, recipe, [mp4], run_dirs={"A01": moved}, progress=False)
        shutil.copytree(fused_store["tmp"] / "V01", moved)  # a run of other features in A01's place
        with pytest.raises(ClassifyError, match="now holds a head trained on feature sets"):
            classify_files(store, recipe, files_of(fused_store["root"], [cid]), device="cpu",
                           run_dirs={"A01": moved}, progress=False)


def test_the_cli_refuses_missing_files_in_one_line_before_any_run(fused_store, capsys):
    code = main(["classify", "--store", str(fused_store["store"]), "--recipe", str(fused_store["recipe"]),
                 str(fused_store["tmp"] / "absent.wav")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fusion classify: error: 1 file(s) not found: {fused_store['tmp'] / 'absent.wav'}"


@pytest.mark.parametrize("cross_fit", [0, 2])
def test_files_named_like_clips_of_the_fit_splits_are_classified_as_any_file(fused_store, tmp_path, cross_fit):
    """A file whose stem is a stored clip id of the recipe's fit splits: its answer is the same as the
    same file's under another name (before: a LeakageError "fit on a split disjoint from the one you
    evaluate", or with cross-fitting an UnknownClipError, though nothing is scored)."""
    recipe = dict(RECIPE, calibration={**RECIPE["calibration"], "cross_fit": cross_fit})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    with open_store(fused_store["store"]) as store:
        ids = store.select(split="fold1_train")[:3]
    files = files_of(fused_store["root"], ids)
    renamed = []
    for f in files:
        copy = tmp_path / f"copy-{f.name}"
        shutil.copy(f, copy)
        renamed.append(copy)
    answers = []
    for given in (files, renamed):
        with warnings.catch_warnings(), open_store(fused_store["store"]) as store:
            warnings.simplefilter("ignore")  # calibration fitted on the runs' training split (a test shortcut)
            answers.append(classify_files(store, FusionRecipe.from_json(path), given, device="cpu", progress=False))
    assert [c.name for c in answers[0].clips] == ids and not answers[0].errors
    np.testing.assert_array_equal(answers[0].probs, answers[1].probs)
