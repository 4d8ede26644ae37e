from featurestore.provenance import fingerprint, is_random_weights, weights_identity


def test_fingerprint_ignores_runtime_but_not_config():
    base = {"encoder": "clip/ViT-B-32@none", "config": {"size": 224}, "weights": {"kind": "random", "seed": 0}}
    with_runtime = dict(base, runtime={"versions": {"torch": "9.9"}, "created": "today"})
    assert fingerprint(base) == fingerprint(with_runtime)
    assert fingerprint(base) != fingerprint(dict(base, config={"size": 288}))
    assert fingerprint(base) != fingerprint(dict(base, weights={"kind": "random", "seed": 1}))


def test_checkpoint_identity_is_its_hash_not_its_path():
    a = {"encoder": "timm/x", "weights": {"kind": "file", "path": "/a/w.pt", "sha256": "ab" * 32}}
    moved = {"encoder": "timm/x", "weights": {"kind": "file", "path": "/b/w.pt", "sha256": "ab" * 32}}
    other = {"encoder": "timm/x", "weights": {"kind": "file", "path": "/a/w.pt", "sha256": "cd" * 32}}
    assert fingerprint(a) == fingerprint(moved)
    assert fingerprint(a) != fingerprint(other)
    assert weights_identity(a) == "file:" + "ab" * 6


def test_random_weights_are_named_as_such():
    prov = {"weights": {"kind": "random", "seed": 3}}
    assert is_random_weights(prov)
    assert weights_identity(prov) == "RANDOM(seed=3)"
    assert not is_random_weights({"weights": {"kind": "pretrained", "tag": "openai"}})
    assert weights_identity({"weights": {"kind": "pretrained", "tag": "openai"}}) == "openai"


def test_segment_count_is_the_datasets_not_the_encoders():
    dev = {"encoder": "logmel", "segments": {"kind": "audio", "n_segments": 10, "segment_seconds": 1.0,
                                             "sample_rate": 48000}}
    evaluation = {"encoder": "logmel", "segments": {"kind": "audio", "n_segments": 1, "segment_seconds": 1.0,
                                                    "sample_rate": 48000}}
    other_rate = {"encoder": "logmel", "segments": {"kind": "audio", "n_segments": 10, "segment_seconds": 1.0,
                                                    "sample_rate": 44100}}
    assert fingerprint(dev) == fingerprint(evaluation)
    assert fingerprint(dev) != fingerprint(other_rate)
    frames12 = {"encoder": "clip/RN101@openai", "segments": {"kind": "frames", "n_frames": 12}}
    frames5 = {"encoder": "clip/RN101@openai", "segments": {"kind": "frames", "n_frames": 5}}
    assert fingerprint(frames12) == fingerprint(frames5)


def test_sets_fingerprinted_before_the_spec_path_rule_still_verify_and_resume(tmp_path):
    """Feature sets made from a checkpoint carry the older fingerprint (spec path included)."""
    import hashlib

    import numpy as np

    from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
    from featurestore.provenance import canonical_json, fingerprint_matches

    prov = {"encoder": "timm/x@/ckpt/w.pt", "config": {}, "segments": {},
            "weights": {"kind": "file", "path": "/ckpt/w.pt", "sha256": "ab" * 32}}
    body = {**prov, "weights": {"kind": "file", "sha256": "ab" * 32}}
    legacy = hashlib.sha256(canonical_json(body).encode()).hexdigest()[:16]
    assert legacy != fingerprint(prov) and fingerprint_matches(legacy, prov)
    assert not fingerprint_matches(legacy, {**prov, "encoder": "timm/x@/elsewhere/w.pt",
                                            "weights": {**prov["weights"], "path": "/elsewhere/w.pt"}})
    path = str(tmp_path / "s.zarr")
    with create_store(path, Manifest("toy", list(TAU_CLASSES), [ClipRecord("a"), ClipRecord("b")])) as store:
        store.create_feature_set("timm/x", 1, (2,), prov)
        store._b.set_attrs("features/timm/x", {"fingerprint": legacy})  # as an older version wrote it
        store.write_rows("timm/x", 0, np.ones((2, 1, 2), np.float16))
    with open_store(path, "a") as store:
        assert store.verify().ok
        assert store.check_feature_set("timm/x", 1, (2,), prov)  # resumes instead of refusing


def test_the_identity_of_a_pretrained_tag_shows_its_files_hash_when_recorded():
    """Two files under one tag (a replaced hub cache) read apart in reports and classify answers;
    before, both were 'openai'."""
    one = {"weights": {"kind": "pretrained", "tag": "openai", "sha256": "ab" * 32}}
    other = {"weights": {"kind": "pretrained", "tag": "openai", "sha256": "cd" * 32}}
    assert weights_identity(one) == "openai:" + "ab" * 6 and weights_identity(one) != weights_identity(other)
    assert weights_identity({"weights": {"kind": "pretrained", "tag": "openai"}}) == "openai"  # recorded before hashes
