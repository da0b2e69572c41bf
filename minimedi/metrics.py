"""Metrics of the fairness report: image quality, text agreement and memorisation, as pure functions.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", eq. 6) fits a Gaussian to the features of each image set and measures the Fréchet (2-
Wasserstein) distance between the two Gaussians:

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)

Lower is better; 0 means the two sets have the same feature mean and covariance. The value depends on
the feature network, so FIDs are only comparable when computed with the same one.

CLIP score (Hessel et al. 2021, "CLIPScore") is how well an image agrees with its caption in CLIP's
embedding space: max(w cos(E_image, E_text), 0) averaged over image/caption pairs. Hessel et al. use
w = 2.5; we report w = 100, as Imagen (Saharia et al. 2022) and torchmetrics' `CLIPScore` do, so the
score is 100 x the clipped cosine (0 to 100).

Nearest-neighbour distance is the memorisation check (Carlini et al. 2023, "Extracting Training Data from
Diffusion Models", use the same idea): the RMS pixel distance from each generated image to its closest
training image. On its own a small number means little; compare it with the distances from held-out
real images to the training set. Generated images much closer to the training set than real unseen images
are copies.
"""
import torch
import torch.nn.functional as F

from minimedi.clip import preprocess
from minimedi.errors import UserError


# ---- FID -----------------------------------------------------------------------------------------------

def gaussian_stats(features):
    """(mu [D], sigma [D, D]) in float64 of features [N, D]: the mean and the unbiased covariance."""
    x = torch.as_tensor(features).detach().to(torch.float64)
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def psd_eigh(matrix):
    """(eigenvalues, eigenvectors) of a symmetric positive semi-definite matrix, round-off zeroed.

    A singular covariance (fewer samples than features) has eigenvalues that are zero in exact arithmetic
    but come out as +-1e-16 * its largest one. Negative ones would make the square root NaN, and positive
    ones turn into sqrt(1e-16) = 1e-8 each after it, so everything below numpy's `matrix_rank` tolerance
    (size x machine epsilon x the largest eigenvalue) counts as exactly zero.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    tolerance = eigenvalues.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, 0.0), eigenvectors


def sqrtm_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix: V diag(sqrt(lambda)) V^T."""
    eigenvalues, eigenvectors = psd_eigh(matrix)
    return (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, as a Python float.

    The common implementation (pytorch-fid) takes scipy's general `sqrtm(S1 @ S2)`. S1 S2 is not
    symmetric, so that needs a Schur decomposition, can return complex values and loses accuracy on
    singular covariances. With A = S1^1/2 and B = S1^1/2 S2, S1 S2 = AB and S1^1/2 S2 S1^1/2 = BA; AB and
    BA have the same eigenvalues, so their square roots have the same trace. BA is symmetric PSD, so
    `eigh` gives its eigenvalues accurately and stably, and the trace is the sum of their square roots.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t).to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = (middle + middle.T) / 2  # symmetric up to round-off; make it exactly so for eigh
    trace_sqrt = psd_eigh(middle)[0].sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return distance.item()


def fid(features_a, features_b):
    """FID between two feature sets [N_a, D] and [N_b, D]."""
    for name, features in (("first", features_a), ("second", features_b)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise UserError(f"FID needs at least 2 feature rows per set; the {name} set has shape "
                            f"{tuple(features.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise UserError(f"FID feature sets differ in width: {features_a.shape[1]} and {features_b.shape[1]}")
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


# ---- CLIP score ----------------------------------------------------------------------------------------

@torch.no_grad()
def clip_score(clip_model, images, tokens, batch_size=256):
    """(mean score, per-image scores [N] float32 on the CPU): 100 * max(cos(E_image_i, E_text_i), 0).

    images [N, 1 or 3, H, W] in [-1, 1]; tokens [N, L] from `Tokenizer()(captions, truncate=True)`, row i
    the caption of image i.
    """
    if len(images) != len(tokens):
        raise UserError(f"CLIP score needs one caption per image, got {len(images)} images and "
                        f"{len(tokens)} captions")
    device = next(clip_model.parameters()).device
    resolution = clip_model.config.image_resolution
    scores = []
    for x, t in zip(images.split(batch_size), tokens.split(batch_size)):
        e_image = F.normalize(clip_model.encode_image(preprocess(x.to(device).float(), resolution)), dim=-1)
        e_text = F.normalize(clip_model.encode_text(t.to(device)), dim=-1)
        scores.append((100 * (e_image * e_text).sum(-1)).clamp(min=0).float().cpu())
    scores = torch.cat(scores)
    return scores.mean().item(), scores


# ---- memorisation --------------------------------------------------------------------------------------

@torch.no_grad()
def nearest_neighbour_distance(queries, references, batch_size=1024):
    """(distance [N_q] float32, index [N_q] long): RMS pixel distance ||q - r|| / sqrt(D) from each query
    to its nearest reference, and that reference's index (the first one on ties).

    Images of any shape are flattened to D values. The references go through in chunks of `batch_size`
    rows, so only an [N_q, batch_size] block of distances exists at a time, and they may stay on the CPU
    while the queries sit on a GPU. Distances use ||q||^2 + ||r||^2 - 2 q.r (one matrix product) in
    float64: in float32 the cancellation leaves an exact copy of a 32x32 image up to ~4e-4 away, not ~0.
    """
    q = queries.reshape(len(queries), -1).to(torch.float64)
    refs = references.reshape(len(references), -1)
    if q.shape[1] != refs.shape[1]:
        raise UserError(f"nearest neighbours need images of the same size: queries have {q.shape[1]} values "
                        f"each, references {refs.shape[1]}")
    if len(refs) == 0:
        raise UserError("nearest neighbours need at least one reference image")
    q_norms = q.square().sum(1, keepdim=True)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64, device=q.device)
    index = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for start in range(0, len(refs), batch_size):
        r = refs[start:start + batch_size].to(q.device, torch.float64)
        squared = q_norms + r.square().sum(1) - 2 * q @ r.T  # [N_q, chunk]
        chunk_best, chunk_index = squared.min(1)
        closer = chunk_best < best  # strict: an earlier chunk keeps a tie
        best = torch.where(closer, chunk_best, best)
        index = torch.where(closer, chunk_index + start, index)
    distance = best.clamp(min=0).sqrt() / q.shape[1] ** 0.5
    return distance.float(), index
