"""Training data: discovery, skipped inputs with reasons, the preprocessed cache, pair sampling."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli import data
from gvsl_cli.config import PreprocessConfig

FAST = PreprocessConfig(spacing=6.0, modality="auto")


@pytest.fixture
def volume_folder(tmp_path, colin_t1, icbm_t1):
    root = tmp_path / "volumes"
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(colin_t1, root / "colin.nii.gz")
    shutil.copy(icbm_t1, root / "sub" / "deeper" / "icbm.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(colin_t1)), str(root / "sub" / "colin_copy.mha"))
    (root / "sub" / "notes.md").write_text("not an image")
    (root / "broken.nii.gz").write_bytes(b"garbage, not gzip")
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(root / "flat.nrrd"))  # a 2D image
    return root


def test_discover_searches_folders_recursively_and_reads_path_lists(volume_folder, tmp_path):
    sources, skipped = data.discover([volume_folder])
    names = sorted(p.name for p in sources)
    assert names == ["broken.nii.gz", "colin.nii.gz", "colin_copy.mha", "flat.nrrd", "icbm.nii.gz"]
    assert skipped == []
    listing = tmp_path / "list.txt"
    listing.write_text("# training volumes\nvolumes/colin.nii.gz\n\nvolumes/missing.nii.gz\n" + f"{volume_folder / 'sub'}\n")
    sources, skipped = data.discover([listing, volume_folder / "colin.nii.gz", tmp_path / "nope", volume_folder / "sub" / "notes.md"])
    assert sorted(p.name for p in sources) == ["colin.nii.gz", "colin_copy.mha", "icbm.nii.gz"]  # duplicates dropped
    reasons = {s.path.split("/")[-1]: s.reason for s in skipped}
    assert "line 4" in reasons["missing.nii.gz"] and "no such file" in reasons["nope"]
    assert "not a volume file" in reasons["notes.md"]


def test_unreadable_volumes_are_skipped_with_one_line_reasons(volume_folder, tmp_path):
    sources, _ = data.discover([volume_folder])
    dataset = data.prepare_dataset(sources, FAST, data.VolumeCache(tmp_path / "cache"), workers=2)
    assert len(dataset.volumes) == 3
    reasons = {s.path.split("/")[-1]: s.reason for s in dataset.skipped}
    assert set(reasons) == {"broken.nii.gz", "flat.nrrd"}
    assert "cannot read" in reasons["broken.nii.gz"] and "2D" in reasons["flat.nrrd"]
    assert all("\n" not in r for r in reasons.values())


def test_second_preparation_reads_no_volume(colin_t1, icbm_t1, tmp_path, monkeypatch):
    cache = data.VolumeCache(tmp_path / "cache")
    reads = []
    original = data.read_and_prepare
    monkeypatch.setattr(data, "read_and_prepare", lambda source, config: reads.append(source) or original(source, config))
    first = data.prepare_dataset([colin_t1, icbm_t1], FAST, cache)
    assert len(reads) == 2
    second = data.prepare_dataset([colin_t1, icbm_t1], FAST, cache)
    assert len(reads) == 2, "the second run decoded a volume instead of using the cache"
    assert [v.key for v in first.volumes] == [v.key for v in second.volumes]
    assert np.array_equal(first.volumes[0].array, second.volumes[0].array)
    # Other preprocessing settings are another entry.
    data.prepare_dataset([colin_t1], PreprocessConfig(spacing=8.0), cache)
    assert len(reads) == 3


def test_cache_key_follows_content_not_name(colin_t1, tmp_path):
    cache = data.VolumeCache(tmp_path / "cache")
    copy = tmp_path / "renamed.nii.gz"
    shutil.copy(colin_t1, copy)
    assert cache.key(copy, FAST) == cache.key(colin_t1, FAST)
    image = sitk.ReadImage(str(colin_t1))
    sitk.WriteImage(image + 1, str(copy))
    assert cache.key(copy, FAST) != cache.key(colin_t1, FAST)


def test_cache_hit_reports_the_path_given_now(colin_t1, tmp_path):
    cache = data.VolumeCache(tmp_path / "cache")
    copy = tmp_path / "renamed.nii.gz"
    shutil.copy(colin_t1, copy)
    first = data.prepare_dataset([colin_t1], FAST, cache).volumes[0]
    hit = data.prepare_dataset([copy], FAST, cache).volumes[0]
    assert hit.key == first.key  # the same entry, found by content
    assert hit.source == str(copy) and first.source == str(colin_t1)


def test_incomplete_cache_entry_is_rebuilt(colin_t1, tmp_path):
    cache = data.VolumeCache(tmp_path / "cache")
    entry = data.prepare_dataset([colin_t1], FAST, cache).volumes[0]
    entry.array_path.with_suffix(".json").unlink()  # as if killed between the two writes
    assert cache.get(entry.key) is None
    again = data.prepare_dataset([colin_t1], FAST, cache).volumes[0]
    assert again.key == entry.key and cache.get(entry.key) is not None


def test_crop_with_padding_pads_small_volumes_with_zeros():
    rng = np.random.default_rng(0)
    volume = np.ones((4, 10, 6), np.float32)
    out = np.full((8, 8, 8), -1.0, np.float32)
    data.crop_with_padding(volume, (8, 8, 8), rng, out)
    assert out.sum() == 4 * 8 * 6  # all of z and x, 8 of the 10 y
    assert set(np.unique(out)) == {0.0, 1.0}


def test_pairs_are_different_volumes_reproducible_and_differ_between_ranks():
    class Fake:
        def __init__(self, value):
            self.array = np.full((16, 16, 16), value, np.float32)
            self.shape = self.array.shape

    volumes = [Fake(i) for i in range(3)]
    rank0 = data.PairSampler(volumes, (8, 8, 8), seed=3, rank=0)
    rank1 = data.PairSampler(volumes, (8, 8, 8), seed=3, rank=1)
    pairs = [rank0.pairs(i, 4) for i in range(1, 30)]
    assert all(a != b for batch in pairs for a, b in batch)
    assert pairs == [rank0.pairs(i, 4) for i in range(1, 30)]
    assert pairs != [rank1.pairs(i, 4) for i in range(1, 30)]
    a, b = rank0.sample(5, 4)
    expected = rank0.pairs(5, 4)
    assert [(int(a[k, 0, 0, 0, 0]), int(b[k, 0, 0, 0, 0])) for k in range(4)] == expected


def test_prefetch_loader_yields_the_batches_of_consecutive_iterations():
    class Fake:
        def __init__(self, value):
            self.array = np.random.default_rng(value).random((20, 20, 20), dtype=np.float32)
            self.shape = self.array.shape

    sampler = data.PairSampler([Fake(i) for i in range(4)], (8, 8, 8), seed=1)
    loader = data.PrefetchLoader(sampler, 2, start=5, workers=2)
    try:
        for iteration in range(5, 12):
            a, b = next(loader)
            ref_a, ref_b = sampler.sample(iteration, 2)
            assert np.array_equal(a.numpy(), ref_a) and np.array_equal(b.numpy(), ref_b)
    finally:
        loader.close()


def test_preprocessed_cache_lives_in_the_same_root_as_weights(tmp_path, monkeypatch):
    from gvsl_cli import data, weights

    monkeypatch.setenv("GVSL_HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / "preprocessed"
    assert weights.cache_root() == tmp_path / "home"
