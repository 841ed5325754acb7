"""The streamed, symmetry-adapted PCA of the linear-ae against dense NumPy PCA of the augmented images."""

import tracemalloc

import numpy as np
import onnxruntime as ort
import pytest

from edge_inspect.errors import ConfigError, ModelCardError
from export.linear_graph import pca_graph
from export.pca import D4Basis, ImageCache, LinearPCA, fit_pca


def parts(n: int, size: int = 12, seed: int = 0) -> np.ndarray:
    """Smooth random images with a decaying spectrum (no ties at the cut), float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = np.stack([np.sin(2 * np.pi * (k % 4 + 1) * xx + k) * np.cos(np.pi * (k // 4) * yy + 0.3 * k)
                         for k in range(16)])
    weights = rng.normal(size=(n, 16)) * (0.9 ** np.arange(16))
    images = 0.5 + 0.05 * np.einsum("nk,khw->nhw", weights, patterns) + 0.01 * rng.normal(size=(n, size, size))
    return np.clip(images, 0, 1).astype(np.float32)


def views(images: np.ndarray) -> np.ndarray:
    """The eight quarter turns and mirror images of each image."""
    return np.concatenate([np.rot90(m, k, axes=(1, 2)) for m in (images, images[:, :, ::-1]) for k in range(4)])


def dense_pca(train: np.ndarray, k: int):
    x = train.reshape(len(train), -1).astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt, s**2 / len(x)


def project(mean, vt, k, images):
    y = images.reshape(len(images), -1).astype(np.float64) - mean
    return (y @ vt[:k].T @ vt[:k] + mean).reshape(images.shape)


def test_the_change_of_basis_is_orthogonal_and_splits_the_square_as_the_design_says():
    basis = D4Basis((256, 256))
    dims = {block.name: (block.copies, block.dim) for block in basis.blocks}
    assert dims == {"A1": (1, 8256), "A2": (1, 8128), "B_diag": (1, 8256), "B_axis": (1, 8128), "E": (2, 16384)}
    small = D4Basis((10, 10))
    x = np.random.default_rng(0).random((3, 100)).astype(np.float32)
    coef = small.forward(x)
    np.testing.assert_allclose(small.inverse(coef), x, atol=1e-6)
    np.testing.assert_allclose((coef**2).sum(axis=1), (x**2).sum(axis=1), rtol=1e-5)
    # a symmetric image has coordinates in A1 only
    sym = views(x[:1].reshape(1, 10, 10)).mean(axis=0).reshape(1, -1)
    c = small.forward(sym)[0]
    a1 = small.blocks[0].index.reshape(-1)
    assert np.abs(np.delete(c, a1)).max() < 1e-6 and np.abs(c[a1]).max() > 0.1


def test_the_augmented_covariance_is_block_diagonal_with_equal_e_copies():
    """Schur's lemma, measured: what the fit relies on to treat blocks alone."""
    basis = D4Basis((8, 8))
    images = views(parts(40, size=8))
    coef = basis.forward(images.reshape(len(images), -1) - images.mean(axis=0).reshape(1, -1))
    cov = coef.T @ coef / len(coef)
    e = basis.blocks[-1].index
    for i, block in enumerate(basis.blocks):
        for other in basis.blocks[i + 1:]:
            assert np.abs(cov[np.ix_(block.index.ravel(), other.index.ravel())]).max() < 1e-5
    np.testing.assert_allclose(cov[np.ix_(e[0], e[0])], cov[np.ix_(e[1], e[1])], atol=1e-5)
    assert np.abs(cov[np.ix_(e[0], e[1])]).max() < 1e-5


@pytest.mark.parametrize("target", [5, 23, 60])
def test_symmetric_fit_reconstructs_like_dense_pca_of_the_eight_views(tmp_path, target):
    train, test = parts(50, seed=0), parts(6, seed=1)
    mean, vt, eig = dense_pca(views(train), target)
    # E's eigenvalues come in equal pairs: where the cut splits a pair the top k are not unique, so cut elsewhere
    k = next(k for k in range(target, len(eig)) if eig[k - 1] > eig[k] * (1 + 1e-6))
    pca = fit_pca(ImageCache.from_array(tmp_path / "c", train), k, power_iterations=6)
    kk = pca.components
    assert kk == k
    np.testing.assert_allclose(pca.reconstruct(test), project(mean, vt, kk, test), atol=2e-4)
    assert pca.explained_variance == pytest.approx(eig[:kk].sum() / eig.sum(), rel=1e-4)
    assert pca.weight_count < 0.3 * kk * 144  # E's basis serves both its copies


def test_plain_fit_reconstructs_like_dense_pca(tmp_path):
    train, test = parts(60, size=10, seed=2), parts(5, size=10, seed=3)
    mean, vt, _ = dense_pca(train, 7)
    pca = fit_pca(ImageCache.from_array(tmp_path / "c", train, "none"), 7, power_iterations=6)
    np.testing.assert_allclose(pca.reconstruct(test), project(mean, vt, 7, test), atol=2e-4)


@pytest.mark.parametrize("augment", ["d4", "none"])
def test_the_onnx_graph_reconstructs_like_the_fit_and_the_file_round_trips(tmp_path, augment):
    train, test = parts(40, seed=4), parts(5, seed=5)
    pca = fit_pca(ImageCache.from_array(tmp_path / "c", train, augment), 20)
    session = ort.InferenceSession(pca_graph(pca, 17).SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": test})[0]
    np.testing.assert_allclose(out, pca.reconstruct(test), atol=1e-5)
    pca.save(tmp_path / "model.npz")
    again = LinearPCA.load(tmp_path / "model.npz")
    np.testing.assert_array_equal(again.reconstruct(test), pca.reconstruct(test))
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(ModelCardError, match="not a saved linear-ae"):
        LinearPCA.load(tmp_path / "bad.npz")


def test_fit_memory_does_not_grow_with_the_number_of_images(tmp_path):
    peaks = {}
    for n in (300, 1500):  # both over one chunk of images
        cache = ImageCache.from_array(tmp_path / f"c{n}", parts(n, size=16, seed=n))
        tracemalloc.start()
        fit_pca(cache, 40)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[1500] < 1.1 * peaks[300], peaks


def test_bad_settings_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="even side.*--augment none"):
        D4Basis((11, 11))
    with pytest.raises(ConfigError, match="--components 64 or fewer"):
        fit_pca(ImageCache.from_array(tmp_path / "c", parts(8, size=8), "d4"), 65)
