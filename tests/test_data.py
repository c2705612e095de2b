"""Training data: discovery, skipped inputs with reasons, the preprocessed cache, pair sampling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl_cli import data
from gvsl_cli.config import PreprocessConfig
from test_dicom_series import write_series

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
    assert sorted(p.name for p in sources) == ["colin.nii.gz", "colin_copy.mha", "icbm.nii.gz"]  # duplicates used once
    reasons = {s.path.split("/")[-1]: s.reason for s in skipped}
    assert reasons["colin.nii.gz"] == "given more than once"  # ... and reported (in the list and as an argument)
    assert "line 4" in reasons["missing.nii.gz"] and "no such file" in reasons["nope"]
    assert "not a volume file" in reasons["notes.md"]


def test_discover_leaves_out_what_it_finds_in_an_output_folder_but_not_files_given(volume_folder):
    sources, _ = data.discover([volume_folder], skip_under=volume_folder / "sub")
    assert sorted(p.name for p in sources) == ["broken.nii.gz", "colin.nii.gz", "flat.nrrd"]  # not sub/'s two
    sources, _ = data.discover([volume_folder / "sub" / "colin_copy.mha"], skip_under=volume_folder / "sub")
    assert [p.name for p in sources] == ["colin_copy.mha"]


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
    monkeypatch.setattr(data, "read_and_prepare", lambda source, config, **kw: reads.append(source) or original(source, config, **kw))
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


def _damage_truncate_half(entry):
    path = entry.array_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_truncate_empty(entry):
    entry.array_path.write_bytes(b"")


def _damage_npy_garbage(entry):
    entry.array_path.write_bytes(b"not an npy file at all" * 100)


def _damage_npy_other_shape(entry):
    np.save(entry.array_path, np.zeros((16, 16, 16), np.float32))


def _damage_npy_other_dtype(entry):
    np.save(entry.array_path, np.load(entry.array_path).astype(np.float64))


def _damage_json_empty_object(entry):
    entry.array_path.with_suffix(".json").write_text("{}")


def _damage_json_not_an_object(entry):
    entry.array_path.with_suffix(".json").write_text("[1, 2]")


def _damage_json_wrong_types(entry):
    meta_path = entry.array_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["shape"] = ["a", 1, 2]
    meta_path.write_text(json.dumps(meta))


def _damage_json_not_utf8(entry):
    entry.array_path.with_suffix(".json").write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate_half,
        _damage_truncate_empty,
        _damage_npy_garbage,
        _damage_npy_other_shape,
        _damage_npy_other_dtype,
        _damage_json_empty_object,
        _damage_json_not_an_object,
        _damage_json_wrong_types,
        _damage_json_not_utf8,
    ],
)
def test_damaged_cache_entry_is_a_miss_and_is_rewritten(damage, colin_t1, tmp_path, monkeypatch):
    cache = data.VolumeCache(tmp_path / "cache")
    reads = []
    original = data.read_and_prepare
    monkeypatch.setattr(data, "read_and_prepare", lambda source, config, **kw: reads.append(source) or original(source, config, **kw))
    entry = data.prepare_dataset([colin_t1], FAST, cache).volumes[0]
    expected = np.load(entry.array_path)  # not memory-mapped: the damage below shrinks the file in place
    damage(entry)
    assert cache.get(entry.key) is None
    again = data.prepare_dataset([colin_t1], FAST, cache)
    assert again.skipped == [] and len(reads) == 2  # prepared again, not skipped, no crash
    assert np.array_equal(again.volumes[0].array, expected)
    assert cache.get(entry.key) is not None  # the entry was rewritten whole
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name]


def test_garbage_stat_file_is_hashed_again(colin_t1, tmp_path):
    cache = data.VolumeCache(tmp_path / "cache")
    key = cache.key(colin_t1, FAST)
    (stat_file,) = (tmp_path / "cache" / "stat").iterdir()
    stat_file.write_bytes(b"\xff" * 64)  # 64 characters, not a digest, not even text
    assert cache.key(colin_t1, FAST) == key
    assert len(stat_file.read_text()) == 64 and stat_file.read_text() != "\ufffd" * 64


def test_new_content_with_the_old_size_and_mtime_gets_a_new_key(colin_t1, tmp_path):
    # An uncompressed volume replaced by another of the same grid (same size), copied with
    # its old mtime (cp -p, rsync -a): the remembered digest must not be served.
    import os
    import shutil

    import SimpleITK as sitk

    volume = tmp_path / "scan.nii"
    image = sitk.ReadImage(str(colin_t1))
    sitk.WriteImage(image, str(volume))
    cache = data.VolumeCache(tmp_path / "cache")
    key = cache.key(volume, FAST)
    stamp = os.stat(volume)
    sitk.WriteImage(sitk.Flip(image, [True, False, False]), str(tmp_path / "new.nii"))
    shutil.copyfile(tmp_path / "new.nii", volume)
    os.utime(volume, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(volume).st_size == stamp.st_size and os.stat(volume).st_mtime_ns == stamp.st_mtime_ns
    assert cache.key(volume, FAST) != key


def test_skipped_reasons_do_not_repeat_the_path(volume_folder, tmp_path, monkeypatch):
    (volume_folder / "empty.nii.gz").write_bytes(b"")
    sources = [volume_folder / "broken.nii.gz", volume_folder / "empty.nii.gz"]
    dataset = data.prepare_dataset(sources, FAST, data.VolumeCache(tmp_path / "cache"))
    assert [s.path for s in dataset.skipped] == [str(p) for p in sources]
    for item in dataset.skipped:
        assert item.path not in item.reason, item.reason
    assert dataset.skipped[1].reason.startswith("file is empty")

    def denied(source, config, **kw):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(data, "read_and_prepare", denied)
    (skipped,) = data.prepare_dataset([volume_folder / "colin.nii.gz"], FAST, data.VolumeCache(tmp_path / "cache")).skipped
    assert skipped.reason == "Permission denied"


def test_the_same_file_given_twice_is_reported_as_skipped(volume_folder):
    colin = volume_folder / "colin.nii.gz"
    detour = volume_folder / "sub" / ".." / "colin.nii.gz"
    sources, skipped = data.discover([colin, colin, detour])
    assert sources == [colin.resolve()]
    assert [(s.path, s.reason) for s in skipped] == [(str(colin), "given more than once"), (str(detour), f"same file as {colin}")]


def test_dataset_says_how_many_volumes_came_from_the_cache(colin_t1, icbm_t1, tmp_path):
    cache = data.VolumeCache(tmp_path / "cache")
    data.prepare_dataset([colin_t1], FAST, cache)
    dataset = data.prepare_dataset([colin_t1, icbm_t1], FAST, cache)
    assert (dataset.prepared, dataset.from_cache) == (1, 1)
    assert [v.from_cache for v in dataset.volumes] == [True, False]
    again = data.prepare_dataset([colin_t1, icbm_t1], FAST, cache)
    assert (again.prepared, again.from_cache) == (0, 2)


def test_a_rank_keeps_its_shard_results_and_reports_progress_over_all_sources(volume_folder, tmp_path, monkeypatch):
    reads = []
    original = data.read_and_prepare
    monkeypatch.setattr(data, "read_and_prepare", lambda source, config, **kw: reads.append(source.name) or original(source, config, **kw))
    sources = [volume_folder / "broken.nii.gz", volume_folder / "colin.nii.gz", volume_folder / "sub" / "colin_copy.mha"]
    progress = []
    barrier = []
    dataset = data.prepare_dataset(
        sources, FAST, data.VolumeCache(tmp_path / "cache"), shard=(0, 2), barrier=lambda: barrier.append(len(progress)), on_progress=lambda *a: progress.append(a)
    )
    assert sorted(reads) == ["broken.nii.gz", "colin.nii.gz", "colin_copy.mha"]  # the broken one read once, not twice
    assert progress == [(1, 3), (2, 3), (3, 3)] and barrier == [2]
    assert [v.source for v in dataset.volumes] == [str(p) for p in sources[1:]]  # the order of the sources
    assert [s.path for s in dataset.skipped] == [str(sources[0])]


def test_cache_hit_on_a_dicom_series_does_not_scan_the_slices(tmp_path, restore_locale, monkeypatch):
    array = np.random.default_rng(0).integers(0, 1000, (12, 24, 24)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((4.0, 4.0, 4.0))
    folder = tmp_path / "series"
    write_series(folder, image, name=lambda k: f"slice{k:03d}.dcm")
    cache = data.VolumeCache(tmp_path / "cache")
    first = data.prepare_dataset([folder], FAST, cache)
    assert first.prepared == 1 and first.skipped == []

    def scan(*args):
        raise AssertionError("a cache hit parsed the DICOM slices")

    monkeypatch.setattr(data, "dicom_series_ids", scan)
    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesFileNames", scan)
    second = data.prepare_dataset([folder], FAST, cache)
    assert second.from_cache == 1 and second.volumes[0].key == first.volumes[0].key
    # Any slice changing still changes the key.
    slices = sorted(folder.iterdir())
    slices[3].write_bytes(slices[4].read_bytes())
    assert cache.key(folder, FAST) != first.volumes[0].key


def test_constant_volumes_are_skipped(colin_t1, tmp_path):
    zeros = sitk.Image([32, 32, 32], sitk.sitkInt16)
    zeros.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(zeros, str(tmp_path / "zeros.nii.gz"))
    sitk.WriteImage(zeros + 7, str(tmp_path / "sevens.nii.gz"))
    sources = [tmp_path / "zeros.nii.gz", colin_t1, tmp_path / "sevens.nii.gz"]
    dataset = data.prepare_dataset(sources, FAST, data.VolumeCache(tmp_path / "cache"))
    assert [v.source for v in dataset.volumes] == [str(colin_t1)]
    assert [s.reason for s in dataset.skipped] == ["constant intensity (all voxels 0)", "constant intensity (all voxels 7)"]


def test_cache_entries_without_a_value_range_are_checked_once(colin_t1, tmp_path):
    # Entries written before the value range was recorded: a constant one is skipped, and
    # the range is added to each so that later runs need not read the array again.
    cache = data.VolumeCache(tmp_path / "cache")
    entry = data.prepare_dataset([colin_t1], FAST, cache).volumes[0]
    meta_path = entry.array_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    expected_range = meta.pop("range")
    meta_path.write_text(json.dumps(meta))
    assert cache.get(entry.key).value_range is None
    assert len(data.prepare_dataset([colin_t1], FAST, cache).volumes) == 1
    assert json.loads(meta_path.read_text())["range"] == expected_range
    np.save(entry.array_path, np.zeros(entry.shape, np.float32))  # an old entry of a blank volume
    meta_path.write_text(json.dumps(meta))
    (skipped,) = data.prepare_dataset([colin_t1], FAST, cache).skipped
    assert skipped.reason == "constant intensity (all voxels 0 after preprocessing)"


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
