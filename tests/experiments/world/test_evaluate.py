"""The shapes-world evaluator: FD and PRDC against closed forms and hand-computed cases, labels, the shipped
classifier's accuracy, folder scoring that separates real from corrupted sets, and loud bad-input errors."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import linalg

from experiments.world import classifier, evaluate, metrics
from training.data import scenes

HELD_OUT = 4242  # a world seed used neither for training (1000+), held-out printout (2000) nor the report (7)
N_SET = 400  # images per scored set: FD on 128-d features is biased upward at small n


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_cov(d, generator):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()  # 7.25 + 4 + 1 + 0
    got = metrics.frechet_gaussians(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected.item(), abs=1e-9) and got == pytest.approx(12.25, abs=1e-9)


def test_frechet_of_full_covariances_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    c1, c2 = random_cov(6, g), random_cov(6, g)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    cross = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(c1.numpy() + c2.numpy() - 2 * cross)
    assert metrics.frechet_gaussians(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_gaussians(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_of_samples_converges_to_the_gaussians_value():
    g = torch.Generator().manual_seed(1)
    c1, c2 = random_cov(4, g), random_cov(4, g)
    mu1, mu2 = torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    expected = metrics.frechet_gaussians(mu1, c1, mu2, c2)

    def draw(mu, cov, n):
        return mu + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T

    errors = [abs(metrics.frechet_distance(draw(mu1, c1, n), draw(mu2, c2, n)) - expected) for n in (200, 50000)]
    assert errors[1] < 0.02 * expected and errors[1] < errors[0]


def test_prdc_of_identical_sets_is_one():
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    result = metrics.prdc(feats, feats.clone(), k=5)
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0
    assert result["density"] == pytest.approx(1.0, abs=1e-9)


def test_prdc_of_far_apart_sets_is_zero():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g) + 100.0
    assert metrics.prdc(real, fake, k=5) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_computed_1d_case():
    # real 0,1,2,3 (k=1 radius 1 each); fake 0.5, 10 (k=1 radius 9.5 each). 0.5 lies in the balls of 0 and 1,
    # 10 in none: precision 1/2, density (2 + 0) / 2 / k = 1, coverage 2/4 (only 0 and 1 have a fake within 1),
    # recall 1 (every real point is within 9.5 of the fake 0.5: the outlier inflation Naeem et al. point out).
    real, fake = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[0.5], [10.0]])
    assert metrics.prdc(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 5 points"):
        metrics.prdc(torch.randn(5, 2), torch.randn(10, 2), k=5)


def scene_from_labels(label):
    """The Scene a label dict names, by looking the indices up in the scenes module's own tables."""
    names = {head: classifier.CLASSES[head][index] for head, index in label.items()}
    shapes = (scenes.Shape(names["shape_a"], names["colour_a"], names["size_a"]),)
    if names["shape_b"] != "none":
        shapes += (scenes.Shape(names["shape_b"], names["colour_b"], names["size_b"]),)
    return scenes.Scene(names["background"], names["layout"], shapes)


def test_labels_round_trip_and_match_the_heads():
    assert classifier.HEADS == {"background": 3, "layout": 7, "shape_a": 3, "colour_a": 5, "size_a": 2,
                                "shape_b": 4, "colour_b": 6, "size_b": 3}
    for index in range(300):
        scene = scenes.parse_caption(scenes.sample(index, seed=HELD_OUT)[0].caption)
        label = classifier.labels(scene)
        assert all(0 <= label[h] < size for h, size in classifier.HEADS.items())
        assert scene_from_labels(label) == scene
    label = classifier.labels(scenes.parse_caption("a small blue square above a large yellow triangle on a white "
                                                   "background"))
    assert label == {"background": 1, "layout": 5, "shape_a": 1, "colour_a": 2, "size_a": 0, "shape_b": 3,
                     "colour_b": 4, "size_b": 2}
    one = classifier.labels(scenes.parse_caption("a large red circle on the left on a grey background"))
    assert (one["layout"], one["shape_b"], one["colour_b"], one["size_b"]) == (0, 0, 0, 0)


def test_prompt_accuracy_of_true_labels_is_one_and_of_shuffled_captions_is_low():
    captions = [scenes.sample(i, seed=HELD_OUT)[0].caption for i in range(200)]
    truth = classifier.label_tensor([scenes.parse_caption(c) for c in captions])
    perfect = metrics.prompt_accuracy(truth, captions)
    assert perfect["prompt_acc"] == perfect["exact_match"] == 1.0
    heads = classifier.HEADS.items()
    logits = {h: torch.nn.functional.one_hot(truth[:, i], size).float() for i, (h, size) in enumerate(heads)}
    assert metrics.prompt_accuracy(logits, captions)["exact_match"] == 1.0
    shuffled = metrics.prompt_accuracy(truth, captions[1:] + captions[:1])
    assert shuffled["prompt_acc"] < 0.6 and shuffled["exact_match"] < 0.05


def test_prompt_accuracy_of_full_captions_is_the_plain_label_match():
    captions = [scenes.sample(i, seed=HELD_OUT)[0].caption for i in range(300)]
    generator = torch.Generator().manual_seed(0)
    truth = classifier.label_tensor([scenes.parse_caption(c) for c in captions])
    preds = torch.where(torch.rand(truth.shape, generator=generator) < 0.2,
                        torch.randint(0, 3, truth.shape, generator=generator), truth)
    right = preds == truth
    got = metrics.prompt_accuracy(preds, captions)
    assert got["prompt_acc"] == right.double().mean().item()
    assert got["exact_match"] == right.all(1).double().mean().item()
    assert got["acc_size_b"] == right[:, 7].double().mean().item()


def test_prompt_accuracy_checks_only_what_an_under_specified_caption_names():
    heads = list(classifier.HEADS)

    def pred(**values):  # a one-shape grey image unless told otherwise
        names = {"background": "grey", "layout": "on the left", "shape_a": "circle", "colour_a": "red",
                 "size_a": "small", "shape_b": "none", "colour_b": "none", "size_b": "none", **values}
        return [classifier.CLASSES[h].index(names[h]) for h in heads]

    # "a red shape": colour_a, the layout's kind (a position) and no second shape are checked: 5 heads
    assert metrics.prompt_accuracy(torch.tensor([pred()]), ["a red shape"])["prompt_acc"] == 1.0
    wrong_colour = metrics.prompt_accuracy(torch.tensor([pred(colour_a="blue")]), ["a red shape"])
    assert wrong_colour["prompt_acc"] == pytest.approx(4 / 5) and wrong_colour["exact_match"] == 0.0
    assert "acc_background" not in wrong_colour and wrong_colour["acc_colour_a"] == 0.0
    two = pred(layout="above", shape_b="square", colour_b="green", size_b="large")
    got = metrics.prompt_accuracy(torch.tensor([pred(shape_a="triangle"), two]), ["a large shape", "two shapes"])
    # "a large shape" (size wrong, 4 of 5 right); "two shapes": a relation and a real second shape, 4 of 4 right
    assert got["prompt_acc"] == pytest.approx(8 / 9) and got["exact_match"] == 0.5
    assert metrics.prompt_accuracy(torch.tensor([two]), ["a shape"])["prompt_acc"] == 0.0  # 4 checked, all wrong


@pytest.fixture(scope="module")
def model():
    return classifier.load_classifier()


def test_shipped_classifier_is_small_and_accurate_on_unseen_images(model):
    assert classifier.DEFAULT_PATH.stat().st_size < 2_000_000
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    images, target = classifier.render(256, HELD_OUT)
    accuracy = classifier.head_accuracy(model, images, target)
    assert min(accuracy.values()) >= 0.95, accuracy


def write(folder, images, captions):
    folder.mkdir(parents=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def all_red(index, scene):
    """The scene redrawn with every shape red: a colour-collapsed generator (fidelity kept, diversity lost)."""
    shapes = tuple(dataclasses.replace(shape, colour="red") for shape in scene.shapes)
    return scenes.render(dataclasses.replace(scene, shapes=shapes), random.Random(index))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real sets of two world seeds, and corrupted copies of the first (same captions)."""
    root = tmp_path_factory.mktemp("eval")
    drawn = [scenes.sample(i, seed=HELD_OUT) for i in range(N_SET)]
    captions, images = [s.caption for s, _ in drawn], [im for _, im in drawn]
    rng = np.random.default_rng(0)

    def noisy(image):
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64)
        return Image.fromarray(np.clip(blurred + rng.normal(0, 16, blurred.shape), 0, 255).astype(np.uint8))

    return {
        "real": write(root / "real", images, captions),
        "real2": scenes.write_folder(root / "real2", N_SET, seed=HELD_OUT + 1),
        "noisy": write(root / "noisy", [noisy(im) for im in images], captions),
        "all_red": write(root / "all_red", [all_red(i, scene) for i, (scene, _) in enumerate(drawn)], captions),
    }


def test_evaluate_folder_separates_real_from_corrupted_sets(model, folders):
    real = evaluate.evaluate_folder(folders["real"], folders["real2"], model=model)
    assert real["n"] == N_SET and real["prompt_acc"] > 0.97 and real["exact_match"] > 0.8
    assert min(real[m] for m in ("precision", "recall", "coverage")) > 0.9
    noisy = evaluate.evaluate_folder(folders["noisy"], folders["real2"], model=model)
    assert noisy["fd"] > 4 * real["fd"], (noisy["fd"], real["fd"])
    assert noisy["prompt_acc"] > 0.95  # trained robust to blur and noise: attributes still read right
    red = evaluate.evaluate_folder(folders["all_red"], folders["real2"], model=model)
    assert red["fd"] > 4 * real["fd"], (red["fd"], real["fd"])
    assert red["prompt_acc"] < real["prompt_acc"] - 0.1 and red["exact_match"] < real["exact_match"] - 0.4
    assert red["precision"] > 0.9 and red["recall"] < 0.5 and red["coverage"] < real["coverage"] - 0.15


def test_evaluate_folder_renders_real_images_when_none_given(model, folders):
    result = evaluate.evaluate_folder(folders["real"], model=model, n_real=300)
    assert result["n_real"] == 300 and result["prompt_acc"] > 0.97


def test_score_cli_prints_and_writes_json(folders, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert evaluate.main(["score", str(folders["real"]), "--real", str(folders["real2"]), "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert set(written) >= {"fd", "prompt_acc", "exact_match", "precision", "recall", "density", "coverage", "n"}
    assert "prompt_acc" in capsys.readouterr().out


def test_bad_folders_raise_errors_that_name_the_problem(model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images .* same-name .txt captions"):
        evaluate.evaluate_folder(empty, model=model)
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate.evaluate_folder(tmp_path / "missing", model=model)
    bare = tmp_path / "bare"
    bare.mkdir()
    scenes.sample(0)[1].save(bare / "a.png")
    with pytest.raises(ValueError, match=r"no same-name \.txt caption \(first: a\.png\)"):
        evaluate.evaluate_folder(bare, model=model)
    (bare / "a.txt").write_text("a photo of a cat")
    with pytest.raises(ValueError, match="'a photo of a cat', not a shapes-world caption"):
        evaluate.evaluate_folder(bare, model=model)
    assert evaluate.main(["score", str(empty)]) == 2
    assert "error: no images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="train-classifier"):
        classifier.load_classifier(tmp_path / "none.safetensors")
