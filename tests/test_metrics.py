"""Report metrics against closed forms and independent references: FID against scipy's sqrtm and the
nuclear-norm identity, CLIP score against CLIP's own forward pass, nearest neighbours against torch.cdist."""
import numpy as np
import pytest
import scipy.linalg
import torch

from minimedi.clip import CLIP, CLIPConfig, preprocess
from minimedi.errors import UserError
from minimedi.metrics import clip_score, fid, frechet_distance, gaussian_stats, nearest_neighbour_distance
from minimedi.tokenizer import Tokenizer


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def fid_by_nuclear_norm(a, b):
    """FID through tr sqrt(S1^1/2 S2 S1^1/2) = ||B A^T||_* where S1 = A^T A, S2 = B^T B and A, B are the
    centred features over sqrt(N - 1): the singular values of B A^T are the square roots of the eigenvalues
    of S1 S2. Exact for singular covariances, with no matrix square root at all."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return mean_term + np.sum(ca ** 2) + np.sum(cb ** 2) - 2 * np.linalg.norm(cb @ ca.T, "nuc")


# ---- FID -----------------------------------------------------------------------------------------------

def test_gaussian_stats_match_numpy():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_diagonal_covariances_closed_form():
    a = torch.tensor([1.0, 4.0, 0.25, 9.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 0.25, 2.0, 3.0, 0.0], dtype=torch.float64)  # zeros: singular, still exact
    mu1 = torch.tensor([0.0, 1, 2, 3, 4, 5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1, 0, 3, 2, 5], dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)


def test_shift_only_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    sigma = random_spd(7, rng)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    got = frechet_distance(torch.tensor(mu1), torch.tensor(sigma), torch.tensor(mu2), torch.tensor(sigma))
    assert got == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_identical_sets_are_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    assert abs(fid(x, x.clone())) < 1e-9


def test_matches_scipy_sqrtm_on_non_commuting_covariances():
    rng = np.random.default_rng(3)
    for d in (2, 8, 32):
        s1, s2 = random_spd(d, rng), random_spd(d, rng)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = frechet_distance(*(torch.tensor(t) for t in (mu1, s1, mu2, s2)))
        assert got == pytest.approx(expected, rel=1e-9)


def test_fid_matches_nuclear_norm_form_and_is_symmetric():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 12, generator=g)
    b = 0.5 * torch.randn(200, 12, generator=g) @ torch.randn(12, 12, generator=g) + 0.3
    assert fid(a, b) == pytest.approx(fid_by_nuclear_norm(a, b), rel=1e-9)
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-9)


def test_fewer_samples_than_features_gives_no_nan():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 40, generator=g), torch.randn(9, 40, generator=g) + 0.1
    got = fid(a, b)
    assert np.isfinite(got)
    assert got == pytest.approx(fid_by_nuclear_norm(a, b), rel=1e-7)
    assert abs(fid(a, a)) < 1e-9


@pytest.mark.parametrize("a, b", [(torch.randn(1, 4), torch.randn(5, 4)), (torch.randn(5, 4), torch.randn(5, 3)),
                                  (torch.randn(5), torch.randn(5, 4))])
def test_fid_rejects_bad_feature_sets(a, b):
    with pytest.raises(UserError):
        fid(a, b)


# ---- CLIP score ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_clip():
    """A random CLIP with the real vocabulary (so real tokenizer output fits), tiny everywhere else."""
    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=16, vocab_size=49408, text_width=32, text_heads=2, text_layers=1,
                        image_resolution=32, vision_width=32, vision_heads=2, vision_layers=1, patch_size=8)
    return CLIP(config).eval()


@pytest.fixture(scope="module")
def pairs():
    """Seven images [-1, 1] at 24 px (resized to CLIP's 32 by `preprocess`) and their captions' tokens."""
    images = torch.rand(7, 1, 24, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    captions = ["axial t1 mri of the brain", "flair, tumour in the left frontal lobe", "t2 weighted slice",
                "contrast-enhanced t1, right temporal lesion", "no tumour", "brain mri", "occipital mass"]
    return images, Tokenizer()(captions, truncate=True)


@torch.no_grad()
def reference_cosines(model, images, tokens):
    """cos(E_image_i, E_text_i) from CLIP's forward pass: the diagonal of its logits over the logit scale."""
    logits, _ = model(preprocess(images, model.config.image_resolution), tokens)
    return logits.diag() / model.logit_scale.exp()


def test_clip_score_is_100_times_clipped_cosine(small_clip, pairs):
    images, tokens = pairs
    mean, per_image = clip_score(small_clip, images, tokens)
    expected = (100 * reference_cosines(small_clip, images, tokens)).clamp(min=0)
    assert per_image.shape == (7,) and per_image.dtype == torch.float32
    torch.testing.assert_close(per_image, expected, rtol=1e-5, atol=1e-4)
    assert mean == pytest.approx(expected.mean().item(), rel=1e-5, abs=1e-4)


def test_clip_score_clips_negative_cosines_to_zero(small_clip, pairs):
    """Negating the text projection negates every cosine: each pair scores in exactly one of the two."""
    images, tokens = pairs
    flipped = CLIP(small_clip.config).eval()
    flipped.load_state_dict(small_clip.state_dict())
    with torch.no_grad():
        flipped.text_projection.neg_()
    _, scores = clip_score(small_clip, images, tokens)
    _, flipped_scores = clip_score(flipped, images, tokens)
    cos = reference_cosines(small_clip, images, tokens)
    assert ((scores == 0) != (flipped_scores == 0)).all()
    torch.testing.assert_close(scores + flipped_scores, 100 * cos.abs(), rtol=1e-5, atol=1e-4)


def test_clip_score_does_not_depend_on_batching(small_clip, pairs):
    images, tokens = pairs
    mean, scores = clip_score(small_clip, images, tokens)
    mean_batched, scores_batched = clip_score(small_clip, images, tokens, batch_size=3)
    torch.testing.assert_close(scores_batched, scores, rtol=1e-5, atol=1e-4)
    assert mean_batched == pytest.approx(mean, rel=1e-5)


def test_clip_score_needs_one_caption_per_image(small_clip, pairs):
    images, tokens = pairs
    with pytest.raises(UserError):
        clip_score(small_clip, images, tokens[:-1])


# ---- nearest neighbours --------------------------------------------------------------------------------

def brute_force(queries, references):
    d = torch.cdist(queries.reshape(len(queries), -1).double(), references.reshape(len(references), -1).double(),
                    compute_mode="donot_use_mm_for_euclid_dist")
    best, index = d.min(1)
    return best / queries[0].numel() ** 0.5, index


@pytest.mark.parametrize("batch_size", [1, 7, 16, 50, 1000])
def test_nearest_neighbour_matches_cdist_across_chunk_boundaries(batch_size):
    g = torch.Generator().manual_seed(7)
    references = torch.rand(50, 1, 8, 8, generator=g) * 2 - 1
    # Noisy copies of references at chunk edges (first / last row of a chunk of 7 and 16, the very
    # first and last), plus queries unlike any reference.
    near = [0, 6, 7, 15, 16, 48, 49]
    queries = torch.cat([references[near] + 0.01 * torch.randn(len(near), 1, 8, 8, generator=g),
                         torch.rand(5, 1, 8, 8, generator=g) * 2 - 1])
    distance, index = nearest_neighbour_distance(queries, references, batch_size=batch_size)
    expected_distance, expected_index = brute_force(queries, references)
    assert distance.dtype == torch.float32 and index.dtype == torch.long and distance.shape == (12,)
    assert index[:len(near)].tolist() == near
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(distance.double(), expected_distance, rtol=1e-6, atol=1e-7)


def test_exact_copy_is_at_distance_zero():
    references = torch.rand(30, 1, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    distance, index = nearest_neighbour_distance(references[[3, 29]], references, batch_size=8)
    assert index.tolist() == [3, 29]
    assert distance.max().item() < 1e-6


def test_distance_is_rms_per_pixel():
    """A constant offset c on every pixel is an RMS distance of exactly c, whatever the image size."""
    references = torch.zeros(4, 1, 16, 16)
    references[1] = 1.0
    distance, index = nearest_neighbour_distance(torch.full((1, 1, 16, 16), 0.75), references)
    assert index.tolist() == [1]
    assert distance.item() == pytest.approx(0.25, rel=1e-6)


def test_nearest_neighbour_rejects_mismatched_sizes():
    with pytest.raises(UserError):
        nearest_neighbour_distance(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 16, 16))
