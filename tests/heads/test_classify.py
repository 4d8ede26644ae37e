"""Classifying files that are in no store: the same probabilities as extraction + predict, from files."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import heads
from featurestore.provenance import file_sha256
from featurestore.store import open_store
from heads.classify import Classifier, classify
from heads.cli import main
from heads.trained import TrainedHead

from tests.heads._extracted import VIDEO_SET, extracted_store, files_of


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The extracted store with two trained runs predicted into it: V (embedding_mlp on the timm
    frames) and A (spectrogram_cnn on log-mel)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("classify")
    root, store_path = extracted_store(tmp)
    configs = {
        "V": heads.TrainConfig(head="embedding_mlp", features=[VIDEO_SET], train_split="fold1_train",
                               val_split="fold1_evaluate", epochs=2, batch_size=4, device="cpu", progress=False),
        "A": heads.TrainConfig(head="spectrogram_cnn", features=["logmel"], train_split="fold1_train", val_split=None,
                               head_config={"backbone": "test_resnet"}, epochs=1, batch_size=4,
                               max_steps_per_epoch=2, device="cpu", progress=False),
    }
    with open_store(store_path, "a") as store:
        for name, cfg in configs.items():
            cfg.out = str(tmp / name)
            heads.train(cfg, store)
            heads.predict(store, tmp / name, name=name, device="cpu", progress=False)
    return {"root": root, "store": store_path, "V": tmp / "V", "A": tmp / "A", "tmp": tmp}


def _stored(store_path, run, ids):
    with open_store(store_path) as store:
        return store.get_predictions(run, ids), list(store.classes)


@pytest.mark.parametrize("run", ["V", "A"])
def test_classify_of_files_equals_predict_into_the_store_then_the_segment_mean(runs, run):
    with open_store(runs["store"]) as store:
        ids = store.select(split="fold1_evaluate")[:6]
    stored, classes = _stored(runs["store"], run, ids)
    result = classify(runs[run], files_of(runs["root"], ids), device="cpu")  # x.wav ... x.mp4: one clip per stem
    assert result.names == ids and result.classes == classes and not result.errors
    np.testing.assert_allclose(result.segment_probs, stored, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.probs, stored.mean(axis=1), rtol=0, atol=1e-6)
    assert result.random_weights  # test_resnet@none (frames) or the random test_resnet backbone (audio)


def test_predict_proba_on_stored_arrays_equals_the_stored_predictions(runs):
    with open_store(runs["store"]) as store:
        ids = store.clip_ids[:7]
        arrays = {VIDEO_SET: store.get_many(VIDEO_SET, ids)}
        stored = store.get_predictions("V", ids)
    trained = TrainedHead.load(runs["V"], "cpu")
    probs = trained.predict_proba(arrays)
    assert probs.shape == stored.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs, stored, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained.predict_proba({VIDEO_SET: arrays[VIDEO_SET][3]}), stored[3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained.predict_proba(arrays, batch_size=2), stored, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="missing \\['timm/test_resnet'\\]"):
        trained.predict_proba({"logmel": arrays[VIDEO_SET]})
    with pytest.raises(ValueError, match="expected \\[n_clips, n_segments, 96\\]"):
        trained.predict_proba({VIDEO_SET: arrays[VIDEO_SET][..., :5]})


def test_one_classifier_classifies_batch_after_batch_as_one_call_does(runs):
    with open_store(runs["store"]) as store:
        ids = store.clip_ids[:7]
    classifier = Classifier(runs["A"], "cpu", batch_size=3)  # 3 encoder calls for 7 clips
    whole = classifier.classify(files_of(runs["root"], ids))
    first, rest = classifier.classify(files_of(runs["root"], ids[:2])), classifier.classify(files_of(runs["root"], ids[2:]))
    assert whole.names == ids and first.names + rest.names == ids
    np.testing.assert_allclose(np.concatenate([first.probs, rest.probs]), whole.probs, rtol=0, atol=1e-6)


def test_cli_prints_a_table_json_and_csv(runs, capsys):
    with open_store(runs["store"]) as store:
        ids = store.select(split="fold1_evaluate")[:3]
    stored, classes = _stored(runs["store"], "V", ids)
    files = [str(f) for f in files_of(runs["root"], ids)]
    out = runs["tmp"] / "probs.csv"
    assert main(["classify", str(runs["V"]), *files, "--device", "cpu", "--out", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("WARNING: RANDOM weights in timm/test_resnet")
    assert lines[1].split() == ["file", "top", "class", "probability"]
    expected = stored.mean(axis=1)
    for line, cid, p in zip(lines[2:], ids, expected):
        assert line.split()[0] == f"{runs['root']}/audio/{cid}.wav+{runs['root']}/video/{cid}.mp4"
        assert line.split()[1:] == [classes[int(p.argmax())], f"{p.max():.4f}"]
    assert "classify: 3 clip(s) classified" in captured.err and "encode" not in captured.err  # -q: no bar
    rows = list(csv.DictReader(out.open()))
    assert [r["clip"] for r in rows] == ids
    np.testing.assert_allclose([[float(r[c]) for c in classes] for r in rows], expected, atol=1e-6)

    assert main(["classify", str(runs["V"]), *files, "--device", "cpu", "--json", "--quiet"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["classes"] == classes and answer["random_weights"] == [VIDEO_SET]
    assert answer["weights_identity"][VIDEO_SET] == "RANDOM(seed=0)"
    assert answer["weights_sha256"] == file_sha256(runs["V"] / "best.safetensors")  # what fusion checks
    assert [c["clip"] for c in answer["clips"]] == ids
    np.testing.assert_allclose([c["segment_probs"] for c in answer["clips"]], stored, atol=1e-6)
    np.testing.assert_allclose([c["probs"] for c in answer["clips"]], expected, atol=1e-6)


def test_cli_errors_are_one_line_and_a_broken_file_fails_only_its_clip(runs, capsys):
    with open_store(runs["store"]) as store:
        ids = store.clip_ids[:2]
    wav, mp4 = files_of(runs["root"], ids[:1])
    run = str(runs["V"])

    assert main(["classify", run, str(wav), "--device", "cpu", "-q"]) == 2  # the video run needs the .mp4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("heads classify: error: clip ") and str(wav) in err and f"'{VIDEO_SET}'" in err
    assert "needs a video file" in err

    assert main(["classify", run, str(runs["tmp"] / "nowhere.mp4"), "-q"]) == 2
    assert "1 file(s) not found: " in capsys.readouterr().err
    text = runs["tmp"] / "notes.txt"
    text.write_text("x")
    assert main(["classify", run, str(text), "-q"]) == 2
    assert "unknown kind of file '.txt'" in capsys.readouterr().err

    broken = runs["tmp"] / "broken" / f"{ids[1]}.mp4"
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes((runs["root"] / "video" / f"{ids[1]}.mp4").read_bytes()[:2000])
    assert main(["classify", run, str(mp4), str(broken), "--device", "cpu", "-q"]) == 1
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.startswith(str(mp4))]) == 1
    failed = [line for line in captured.out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {ids[1]}: {VIDEO_SET}: decode failed: {broken}")
    assert "Traceback" not in captured.err


def test_a_run_without_recorded_provenance_reads_it_from_the_store(runs, tmp_path):
    """Runs trained before runs recorded their feature sets' provenance classify through a store."""
    old = tmp_path / "old"
    shutil.copytree(runs["V"], old)
    info = json.loads((old / "run.json").read_text())
    del info["feature_provenance"]
    info["train"]["store"] = None
    (old / "run.json").write_text(json.dumps(info))
    with open_store(runs["store"]) as store:
        ids = store.clip_ids[:2]
    files = files_of(runs["root"], ids, audio=False)
    with pytest.raises(ValueError, match="records neither its feature sets' provenance nor a store"):
        Classifier(old, "cpu")
    result = Classifier(old, "cpu", store=runs["store"]).classify(files)
    np.testing.assert_allclose(result.probs, _stored(runs["store"], "V", ids)[0].mean(axis=1), atol=1e-6)


def test_provenance_that_does_not_match_the_trained_fingerprint_is_refused(runs, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(runs["V"], changed)
    info = json.loads((changed / "run.json").read_text())
    info["feature_provenance"][VIDEO_SET]["segments"]["kind"] = "something else"
    (changed / "run.json").write_text(json.dumps(info))
    with pytest.raises(heads.FeatureFingerprintError, match=VIDEO_SET):
        Classifier(changed, "cpu")
