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
