"""The subgroup classifier: it learns, its calibration is measured and fixed correctly, labels map right."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimedi.classifier import (
    SubgroupClassifier, augment, class_shares, expected_calibration_error, fit_temperature, heldout_groups,
    subgroup_labels, train_classifier)
from minimedi.config import make_config
from minimedi.data.phantom import PhantomCorpus
from minimedi.errors import UserError


def disks(n, seed, size=16):
    """Bright disks on a -1 background, label 1 = the larger (radius 4.5 vs 3.5, +-0.8 uniform): a toy
    "head size" whose classes overlap, so the best accuracy is about 91%, not 100%."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    radius = torch.where(labels == 1, 4.5, 3.5) + 0.8 * (2 * torch.rand(n, generator=g) - 1)
    centre = size / 2 - 0.5 + (2 * torch.rand(n, 2, generator=g) - 1)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    images = torch.where(dist < radius[:, None, None], 0.6, -1.0) + 0.1 * torch.randn(n, size, size, generator=g)
    return images[:, None].clamp(-1, 1), labels


def test_learns_a_size_task_well_above_chance():
    images, labels = disks(600, seed=0)
    cfg = make_config("tiny", classifier={"steps": 100, "batch": 32, "lr": 3e-3}).classifier
    logged = []
    model, metrics = train_classifier(images, labels, cfg, "cpu", log=lambda **m: logged.append(m),
                                      generator=torch.Generator().manual_seed(0))
    assert metrics["accuracy"] > 0.72 and metrics["n_heldout"] == 120  # chance: 0.5, best possible: ~0.91
    assert metrics["n_heldout_groups"] == 120 and len(metrics["heldout_groups"]) == 120  # one image per group
    held = torch.tensor(metrics["heldout_groups"])
    assert abs(labels[held].float().mean() - labels.float().mean()) < 0.01  # stratified: the classes' shares
    assert logged and logged[-1]["step"] == 99
    test_images, test_labels = disks(200, seed=1)
    with torch.no_grad():
        probs = model.predict_proba(test_images)
    assert (probs.argmax(-1) == test_labels).float().mean() > 0.72
    torch.testing.assert_close(probs.sum(-1), torch.ones(200))
    assert float(model.temperature) == pytest.approx(metrics["temperature"])
    assert "temperature" in model.state_dict()


def test_predict_proba_applies_the_temperature():
    model = SubgroupClassifier(num_classes=3, width=8).eval()
    x = torch.randn(4, 1, 16, 16)
    model.temperature.fill_(2.5)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_proba(x), torch.softmax(model(x) / 2.5, dim=-1))


def test_temperature_scaling_lowers_held_out_nll():
    g = torch.Generator().manual_seed(0)

    def overconfident(n):
        true_logits = torch.randn(n, 3, generator=g)
        labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g)[:, 0]
        return 3.0 * true_logits, labels  # a network three times too sure of itself

    logits, labels = overconfident(2000)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    held_logits, held_labels = overconfident(2000)
    assert F.cross_entropy(held_logits / t, held_labels) < F.cross_entropy(held_logits, held_labels) - 0.1
    probs_before, probs_after = torch.softmax(held_logits, -1), torch.softmax(held_logits / t, -1)
    assert expected_calibration_error(probs_after, held_labels) < expected_calibration_error(probs_before, held_labels)


def test_ece_hand_example():
    probs = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    # bins of width 0.2: {0.9} right, gap 0.1; {0.75 wrong, 0.7 right}: |0.5 - 0.725|; {0.55} right, gap 0.45
    expected = 0.25 * 0.1 + 0.5 * 0.225 + 0.25 * 0.45
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(expected, abs=1e-6)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_subgroup_labels():
    items = [{"sex": "female", "age": 49}, {"sex": "male", "age": 50}, {"sex": "female", "age": 80.5},
             {"sex": "male", "age": 20}]
    assert subgroup_labels(items, "sex").tolist() == [1, 0, 1, 0]
    assert subgroup_labels(items, "age").tolist() == [0, 1, 1, 0]
    assert subgroup_labels(items, "sex_age").tolist() == [2, 1, 3, 0]
    assert class_shares(subgroup_labels(items, "sex_age"), 4).tolist() == [0.25] * 4
    corpus = PhantomCorpus(12, 16, p_female=0.5, seed=0, kind="target")
    attributes = [corpus.attributes(i) for i in range(12)]
    assert subgroup_labels(attributes, "sex").tolist() == [a["label"] for a in attributes]
    with pytest.raises(UserError, match="axis"):
        subgroup_labels(items, "height")
    with pytest.raises(UserError, match="age"):
        subgroup_labels([{"sex": "male"}], "sex_age")
    with pytest.raises(UserError, match="sex must be"):
        subgroup_labels([{"sex": "F"}], "sex")


def test_augmentation_is_seeded_and_keeps_the_background():
    images, _ = disks(8, seed=0)
    a = augment(images, torch.Generator().manual_seed(3))
    b = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape
    blank = augment(torch.full((4, 1, 16, 16), -1.0), torch.Generator().manual_seed(0), noise=0.0)
    assert torch.equal(blank, torch.full_like(blank, -1.0))
    plain = augment(images, torch.Generator().manual_seed(1), max_shift=0, gain=0.0, noise=0.0)
    for x, y in zip(images, plain):  # what is left is a horizontal flip or nothing, never a vertical one
        assert torch.allclose(y, x, atol=1e-6) or torch.allclose(y, x.flip(-1), atol=1e-6)


def test_blur_augmentation_mixes_in_the_3x3_mean_of_each_pixel():
    images, _ = disks(6, seed=0)
    out = augment(images, torch.Generator().manual_seed(2), max_shift=0, gain=0.0, noise=0.0, blur=1.0)
    # an independent 3 x 3 mean with the edge pixels repeated, per pixel
    padded = np.pad(images.numpy()[:, 0], ((0, 0), (1, 1), (1, 1)), mode="edge")
    mean = sum(padded[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9
    weights = []
    for x, y, m in zip(images[:, 0].numpy(), out[:, 0].numpy(), mean):
        for candidate in (y, y[:, ::-1]):  # undo the flip, if there was one
            w = ((candidate - x) * (m - x)).sum() / ((m - x) ** 2).sum()  # the mixing weight, by least squares
            if np.allclose(candidate, x + w * (m - x), atol=1e-5):
                weights.append(w)
                break
        else:
            raise AssertionError("an augmented image is not the image mixed with its 3 x 3 mean")
    assert 0 <= min(weights) and max(weights) <= 1 and max(weights) - min(weights) > 0.2  # drawn per image


def test_bad_training_input_is_a_user_error():
    cfg = make_config("tiny").classifier
    with pytest.raises(UserError, match="labels must lie"):
        train_classifier(torch.zeros(20, 1, 16, 16), torch.full((20,), 2), cfg)
    with pytest.raises(UserError, match="one label and one group each"):
        train_classifier(torch.zeros(20, 1, 16, 16), torch.zeros(19, dtype=torch.long), cfg)
    with pytest.raises(UserError, match="one label and one group each"):
        train_classifier(torch.zeros(20, 1, 16, 16), torch.zeros(20, dtype=torch.long), cfg, groups=range(19))
    with pytest.raises(UserError, match="every class has a single one"):
        train_classifier(torch.zeros(20, 1, 16, 16), (torch.arange(20) >= 10).long(), cfg, groups=[0] * 10 + [1] * 10)
    with pytest.raises(UserError, match="leave 0 training"):
        train_classifier(torch.zeros(20, 1, 16, 16), torch.zeros(20, dtype=torch.long), cfg, heldout=range(20))


def test_heldout_groups_keep_subjects_whole_and_classes_in_proportion():
    # 30 subjects (10 female) with 1 to 5 slices each; a subject's label is the same on all its slices
    sizes = [1 + (7 * s) % 5 for s in range(30)]
    groups = [f"S{s:02d}" for s, n in enumerate(sizes) for _ in range(n)]
    labels = torch.tensor([int(s % 3 == 0) for s, n in enumerate(sizes) for _ in range(n)])
    held = heldout_groups(labels, groups, 0.2, torch.Generator().manual_seed(0))
    assert len(held) == len(set(held)) and set(held) <= set(groups)
    female = {g for g, label in zip(groups, labels.tolist()) if label == 1}
    assert len(female & set(held)) == 2 and len(set(held) - female) == 4  # round(0.2 * 10), round(0.2 * 20)
    assert held == sorted(held, key=groups.index)                        # in order of first appearance
    assert held == heldout_groups(labels, groups, 0.2, torch.Generator().manual_seed(0))
    assert held != heldout_groups(labels, groups, 0.2, torch.Generator().manual_seed(1))
    # a class with two subjects gives one; a class with one subject keeps it for training
    labels = torch.tensor([0, 0, 1, 1, 1])
    assert heldout_groups(labels, ["a", "a", "b", "c", "c"], 0.01, torch.Generator().manual_seed(0)) in (["b"], ["c"])
    assert heldout_groups(labels, ["a", "a", "b", "c", "c"], 0.99, torch.Generator().manual_seed(0)) in (["b"], ["c"])


def test_a_split_by_subject_is_honest_where_a_split_by_image_leaks():
    """40 subjects, 6 near-identical slices each, a label drawn per subject that the pixels do not carry.
    Split by image, the held-out slices have siblings in training and the network scores by memory; split
    by subject it can only guess."""
    g = torch.Generator().manual_seed(0)
    patterns = F.interpolate(torch.randn(40, 1, 4, 4, generator=g), size=16, mode="bilinear").clamp(-1, 1)
    groups = [s for s in range(40) for _ in range(6)]
    images = (patterns[groups] + 0.1 * torch.randn(240, 1, 16, 16, generator=g)).clamp(-1, 1)
    labels = (torch.tensor(groups) % 2)
    cfg = make_config("tiny", classifier={"steps": 80, "batch": 32, "lr": 3e-3, "holdout": 0.5}).classifier
    _, by_image = train_classifier(images, labels, cfg, generator=torch.Generator().manual_seed(0))
    _, by_subject = train_classifier(images, labels, cfg, generator=torch.Generator().manual_seed(0), groups=groups)
    assert by_subject["n_heldout_groups"] == 20 and by_subject["n_heldout"] == 6 * 20  # whole subjects
    assert by_image["accuracy"] > 0.75 and by_subject["accuracy"] < 0.65


def test_the_vgg_check_architecture_learns_and_round_trips(tmp_path):
    """The independent check classifier: another trunk, same interface, saved and loaded like classifier.pt."""
    from minimedi.checkpoint import save_checkpoint
    from minimedi.classifier import load_classifier
    from minimedi.config import config_to_dict

    images, labels = disks(600, seed=0)
    cfg = make_config("tiny", classifier={"arch": "vgg", "steps": 100, "batch": 32, "lr": 3e-3})
    torch.manual_seed(0)
    model, metrics = train_classifier(images, labels, cfg.classifier, generator=torch.Generator().manual_seed(0))
    assert metrics["accuracy"] > 0.72
    assert not hasattr(model.stem, "weight") and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    path = tmp_path / "check.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "classes": ["male", "female"]})
    loaded, ckpt = load_classifier(path)
    test_images, _ = disks(50, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(test_images), model.predict_proba(test_images))
    assert ckpt["classes"] == ["male", "female"] and not any(p.requires_grad for p in loaded.parameters())


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="architecture"):
        SubgroupClassifier(2, 8, arch="transformer")
