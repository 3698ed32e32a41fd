"""Batches, augmentation, sharding, class subsets and the image-folder loader."""
import io
import os
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mwt_ray.core.data import ImageData, _crop_and_flip, iterate_batches, load_dataset


def tiny_data(n=40, classes=4, size=8):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return ImageData(images, labels, images[:8], labels[:8], [f"c{i}" for i in range(classes)])


def test_crop_and_flip_matches_per_sample_loop():
    x = torch.randn(5, 3, 6, 6)
    offsets = torch.randint(0, 9, (5, 2))
    flips = torch.tensor([True, False, True, False, True])
    out = _crop_and_flip(x, offsets, flips)
    for i in range(5):
        padded = F.pad(x[i], (4, 4, 4, 4))
        crop = padded[:, offsets[i, 0]:offsets[i, 0] + 6, offsets[i, 1]:offsets[i, 1] + 6]
        torch.testing.assert_close(out[i], crop.flip(-1) if flips[i] else crop)


def test_rank_slices_tile_the_global_batch():
    data = tiny_data()
    kwargs = dict(mean=data.mean, std=data.std, shuffle=True, augment=True, seed=7, drop_last=True)
    single = list(iterate_batches(data.train_images, data.train_labels, 12, **kwargs))
    shards = [
        list(iterate_batches(data.train_images, data.train_labels, 12, rank=r, world_size=3, **kwargs))
        for r in range(3)
    ]
    assert len(single) == 3
    for step, (x, y) in enumerate(single):
        torch.testing.assert_close(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)


def test_normalisation_and_epoch_coverage():
    data = tiny_data()
    batches = list(
        iterate_batches(data.train_images, data.train_labels, 16, mean=data.mean, std=data.std, shuffle=True, seed=3)
    )
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(data.train_labels.tolist())
    x = torch.cat([b[0] for b in batches])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_subset_remaps_labels_and_rejects_bad_classes():
    data = tiny_data()
    sub = data.subset([3, 1])
    assert sub.classes == ["c3", "c1"]
    assert set(sub.train_labels.tolist()) == {0, 1}
    assert torch.equal(sub.train_images[sub.train_labels == 0], data.train_images[data.train_labels == 3])
    for bad, message in [([1, 9], "out of range"), ([1, 1], "repeat"), ([2], "at least 2")]:
        with pytest.raises(ValueError, match=message):
            data.subset(bad)


def test_holdout_is_per_class_and_disjoint():
    data = tiny_data(n=80)
    rest, val_x, val_y = data.holdout(0.25, seed=0)
    assert len(val_y) == 20 and len(rest.train_labels) == 60
    assert torch.bincount(val_y).tolist() == [5, 5, 5, 5]


def test_empty_class_is_an_error():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"2 \(c\) have no training samples"):
        ImageData(images, torch.tensor([0, 1, 0, 1]), images, torch.tensor([0, 1, 0, 1]), ["a", "b", "c"])


def test_digits_is_embedded_and_32x32():
    data = load_dataset("digits")
    assert data.train_images.shape[1:] == (3, 32, 32) and data.num_classes == 10
    assert len(data.train_labels) + len(data.test_labels) == 1797


def test_digits_cache_holds_the_same_split_and_a_damaged_one_is_rebuilt(tmp_path, monkeypatch):
    """The cached digits are the ones scikit-learn's stratified split gives (built here without the
    cache), and a damaged or unwritable cache never breaks loading."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    built = load_dataset("digits", image_size=16)
    (cached,) = (tmp_path / "cache").glob("digits-16-*.pt")
    again = load_dataset("digits", image_size=16)
    labels = load_digits().target
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    for data in (built, again):
        assert data.train_labels.tolist() == labels[train_idx].tolist()
        assert data.test_labels.tolist() == labels[test_idx].tolist()
        assert data.train_images.shape == (len(train_idx), 3, 16, 16)
    assert torch.equal(built.train_images, again.train_images) and torch.equal(built.test_images, again.test_images)
    cached.write_bytes(b"not a tensor file")
    assert torch.equal(load_dataset("digits", image_size=16).train_images, built.train_images)
    assert cached.stat().st_size > 1000  # rebuilt
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MWT_RAY_CACHE", str(blocker / "cache"))  # a cache folder that cannot be made
    assert torch.equal(load_dataset("digits", image_size=16).test_images, built.test_images)


def test_image_folder_decodes_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, count in [("train", 3), ("test", 2)]:
        for name in ["cat", "dog"]:
            folder = tmp_path / "ds" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_dataset("folder", str(tmp_path / "ds"), image_size=16)
    assert data.classes == ["cat", "dog"] and data.train_images.shape == (6, 3, 16, 16)
    assert len(list((tmp_path / "cache" / "folders").glob("*.pt"))) == 1
    again = load_dataset("folder", str(tmp_path / "ds"), image_size=16)
    assert torch.equal(again.train_images, data.train_images)


@pytest.mark.parametrize("name,root,message", [
    ("folder", "/nonexistent/path", "does not exist"),
    ("imagenet", None, "unknown dataset"),
    ("cifar10", None, "needs data.root"),
])
def test_bad_dataset_arguments(name, root, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(name, root)


def test_missing_cifar_without_download(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_dataset("cifar10", str(tmp_path))


def make_folder(root, per_class=3, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cache_notices_an_image_replaced_in_place(tmp_path, monkeypatch):
    """Same file count, same folder mtime, new pixels: the cache must not serve the old tensors."""
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "ds")
    first = load_dataset("folder", str(tmp_path / "ds"), image_size=8)
    target = tmp_path / "ds" / "train" / "cat" / "1.png"
    folder_times = [(p, p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (target.parent, tmp_path / "ds" / "train")]
    replacement = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(replacement).save(target)
    for path, atime, mtime in folder_times:
        os.utime(path, ns=(atime, mtime))
    second = load_dataset("folder", str(tmp_path / "ds"), image_size=8)
    index = 1  # train files sort as (cat, 0..2), (dog, 0..2)
    assert not torch.equal(first.train_images[index], second.train_images[index])
    assert torch.equal(second.train_images[index], torch.from_numpy(replacement).permute(2, 0, 1))
    assert torch.equal(first.train_images[2:], second.train_images[2:])
    assert len(list((tmp_path / "cache" / "folders").glob("*.pt"))) == 2


def test_decoding_shows_progress_lines_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MWT_RAY_PROGRESS_EVERY_S", "0")
    make_folder(tmp_path / "ds")
    load_dataset("folder", str(tmp_path / "ds"), image_size=8)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("decoding ds: ")]
    assert [line.split(": ")[1].split()[0] for line in lines] == [f"{k}/12" for k in range(1, 12)]


def test_progress_is_a_bar_on_a_terminal(monkeypatch, capsys):
    from mwt_ray.core.progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    def slow():
        for i in range(5):
            time.sleep(0.15)  # tqdm redraws at most every 0.1 s
            yield i

    assert list(progress(slow(), 5, "counting", unit="items")) == [0, 1, 2, 3, 4]
    assert "counting:" in terminal.getvalue() and "3/5" in terminal.getvalue()
    assert capsys.readouterr().out == ""


def test_damaged_archive_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MWT_RAY_CACHE", str(tmp_path / "cache"))
    make_folder(tmp_path / "ds", per_class=30)
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "ds", arcname="ds")
    archive.write_bytes(archive.read_bytes()[:-2000])
    with pytest.raises(ValueError, match="damaged or truncated tar archive") as info:
        load_dataset("folder", str(archive), image_size=8)
    assert "\n" not in str(info.value) and not (tmp_path / "cache").exists()
