"""Few-shot evaluation (bmssl/eval.py): the episode sampler, the two protocols on synthetic
data whose answer is known, the confidence interval."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bmssl.eval import EpisodeSampler, confidence_interval, evaluate
from bmssl.meta import MetaConfig, MetaLearner
from bmssl.models import ConvNet, FewShotModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Pixels(nn.Module):
    """Identity backbone: the features are the pixels (plus a unused weight, so it has a dtype)."""

    def __init__(self, image_shape=(1, 8, 8)):
        super().__init__()
        self.feature_dim = math.prod(image_shape)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return images.flatten(1)


def clusters(classes=12, per_class=20, noise=0.05, seed=0):
    """Each class is a random 8x8 image; its members are that image plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(classes, 1, 8, 8, generator=generator)
    images = centres.repeat_interleave(per_class, 0)
    images = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return images, torch.arange(classes).repeat_interleave(per_class)


def conv_model(seed=0):
    torch.manual_seed(seed)
    return FewShotModel(ConvNet((1, 8, 8), hidden=8, depth=2), projection_dim=8)


def test_sampler_is_seeded_and_uses_the_task_batch_layout():
    images, labels = clusters(classes=8, per_class=10)
    first = EpisodeSampler(labels, ways=3, shots=2, queries=4, seed=1).sample(images, 5)
    again = EpisodeSampler(labels, ways=3, shots=2, queries=4, seed=1).sample(images, 5)
    other = EpisodeSampler(labels, ways=3, shots=2, queries=4, seed=2).sample(images, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first.support, other.support)
    assert first.support.shape == (5, 6, 1, 8, 8) and first.query.shape == (5, 12, 1, 8, 8)
    assert torch.equal(first.support_labels[0], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(first.query_labels[0], torch.arange(3).repeat_interleave(4))

    sampler = EpisodeSampler(labels, ways=3, shots=2, queries=4, seed=3)
    support, query = sampler.indices(20)
    for s, q in zip(support, query):
        assert not set(s.tolist()) & set(q.tolist())
        support_classes = labels[s].reshape(3, 2)
        assert (support_classes == support_classes[:, :1]).all()  # one class per row, class-major
        assert len(set(support_classes[:, 0].tolist())) == 3
        assert torch.equal(labels[q].reshape(3, 4)[:, 0], support_classes[:, 0])


def test_sampler_warns_about_the_classes_too_small_for_an_episode():
    labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 6 + [3] * 3 + [4] * 2)
    with pytest.warns(UserWarning, match=r"2 of 5 classes have fewer than 6 images .* \(class ids \[3, 4\]\)"):
        sampler = EpisodeSampler(labels, ways=3, shots=2, queries=4)
    assert sampler.left_out == [3, 4] and len(sampler.class_indices) == 3
    support, query = sampler.indices(10)
    assert not set(labels[torch.cat([support, query], 1).flatten()].tolist()) & {3, 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EpisodeSampler(labels, ways=3, shots=1, queries=1).left_out == []


def test_proto_on_separated_clusters_is_near_perfect():
    images, labels = clusters()
    pixels = FewShotModel(Pixels(), projection_dim=4)
    result = evaluate(pixels, images, labels, "proto", ways=5, shots=1, episodes=40, show_progress=False)
    assert result.mean > 0.99
    conv = evaluate(conv_model(), images, labels, "proto", ways=5, shots=1, episodes=40, show_progress=False)
    assert conv.mean > 0.9


def test_proto_on_random_labels_is_at_chance():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(600, 1, 8, 8, generator=generator)
    labels = torch.randperm(600, generator=generator) % 30  # 20 images per class, in random order
    result = evaluate(conv_model(), images, labels, "proto", ways=5, shots=1, episodes=200,
                      batch_episodes=50, show_progress=False)
    assert abs(result.mean - 0.2) < max(3 * result.ci95, 0.03)
    assert result.accuracies.shape == (200,)


def test_confidence_interval_is_1_96_std_over_sqrt_episodes():
    accuracies = np.array([0.2, 0.4, 0.4, 0.6, 1.0])
    expected = 1.96 * np.sqrt(np.mean((accuracies - accuracies.mean()) ** 2)) / np.sqrt(5)
    assert confidence_interval(accuracies) == pytest.approx(expected, rel=1e-12)
    assert confidence_interval([0.5]) == 0.0
    images, labels = clusters(noise=0.3)
    result = evaluate(conv_model(), images, labels, "proto", episodes=30, show_progress=False)
    assert result.ci95 == pytest.approx(1.96 * result.accuracies.std() / math.sqrt(30))
    assert result.mean == pytest.approx(result.accuracies.mean())
    assert "5-way 1-shot, proto, 30 episodes" in str(result)


def test_finetune_runs_and_beats_chance_on_separable_data():
    images, labels = clusters(noise=0.1)
    result = evaluate(conv_model(), images, labels, "finetune", ways=5, shots=2, episodes=16, batch_episodes=8,
                      inner_steps=5, inner_lr=0.1, show_progress=False)
    assert result.mean > 0.9

    learner = MetaLearner(MetaConfig(inner_steps=2, inner_lr=0.1, projection_dim=8),
                          ConvNet((1, 8, 8), hidden=8, depth=2))
    from_learner = evaluate(learner, images, labels, "finetune", episodes=4, show_progress=False)
    assert from_learner.protocol == "finetune" and from_learner.accuracies.shape == (4,)


def test_bad_arguments_raise_value_errors():
    images, labels = clusters(classes=4, per_class=10)
    model = conv_model()
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(model, images, labels, "knn")
    with pytest.raises(ValueError, match="only 4 of 4 classes"):
        evaluate(model, images, labels, ways=5, queries=5)
    with pytest.raises(ValueError, match=">= 16 images"):
        evaluate(model, images, labels, ways=2, shots=1, queries=15)
    with pytest.raises(ValueError, match="episodes must be"):
        evaluate(model, images, labels, ways=2, queries=5, episodes=0)
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, images, labels[:-1], ways=2, queries=5)
    with pytest.raises(ValueError, match="float"):
        evaluate(model, (images * 255).to(torch.uint8), labels, ways=2, queries=5)
    with pytest.raises(ValueError, match="MetaLearner or a FewShotModel"):
        evaluate(nn.Linear(2, 2), images, labels)


def test_non_finite_scores_raise_instead_of_reading_as_chance():
    """argmax over NaN picks class 0, which looks like 1/ways accuracy: evaluate must raise."""
    images, labels = clusters(classes=4, per_class=10)
    with pytest.raises(FloatingPointError, match="finetune.*not finite.*lower the finetune learning rate"):
        evaluate(conv_model(), images, labels, "finetune", ways=2, shots=1, queries=3, episodes=2,
                 inner_steps=3, inner_lr=1e300, show_progress=False)
    model = conv_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="proto: the features of θ are not finite"):
        evaluate(model, images, labels, "proto", ways=2, shots=1, queries=3, episodes=2, show_progress=False)


def test_collapsed_features_raise_instead_of_reading_as_chance():
    """The same feature vector for every image: every score ties, argmax picks class 0, and
    evaluate reported an exact 20.00 ± 0.00 for both protocols."""
    images, labels = clusters(classes=10)
    model = conv_model()
    with torch.no_grad():
        last_norm = model.backbone.blocks[-3]  # [conv, norm, relu, pool] of the last block
        last_norm.weight.zero_()
        last_norm.bias.fill_(0.5)
    # proto's cosines tie exactly; finetune's logits differ by rounding noise, the same for every query
    for protocol, found in (("proto", "same score for every class in 4 of 4 episodes"),
                            ("finetune", "predict one class for every query of all 4 episodes")):
        with pytest.raises(ValueError, match=f"{protocol}: .* {found}"):
            evaluate(model, images, labels, protocol, ways=5, shots=1, episodes=4, inner_steps=1, inner_lr=0.1,
                     show_progress=False)


def test_proto_with_batch_statistics_normalises_support_and_query_apart():
    """One backbone call over support + query let the query images move the prototypes."""
    from bmssl.eval import proto_accuracy
    from bmssl.meta import detached

    torch.manual_seed(0)
    model = FewShotModel(ConvNet((1, 8, 8), hidden=8, depth=2, norm="batch"), projection_dim=8)
    params = detached(model.meta_parameters())
    images, labels = clusters(classes=5, noise=0.3)
    episodes = EpisodeSampler(labels, 5, 1, 15, seed=0).sample(images, 6)
    got = proto_accuracy(model, params, episodes, 5)
    for e in range(6):
        support = torch.nn.functional.normalize(model.features(params, episodes.support[e]), dim=-1)
        query = torch.nn.functional.normalize(model.features(params, episodes.query[e]), dim=-1)
        predicted = (query @ torch.nn.functional.normalize(support, dim=-1).T).argmax(-1)
        assert got[e] == (predicted == episodes.query_labels[e]).double().mean()


def test_finetune_with_no_step_from_the_zero_head_is_refused():
    """0 SGD steps from the zero head: all-zero logits, class 0 for every query, an exact 20.00 ± 0.00
    that looked like a result."""
    images, labels = clusters(noise=0.1)
    with pytest.raises(ValueError, match="0 SGD steps from the zero head"):
        evaluate(conv_model(), images, labels, "finetune", inner_steps=0, episodes=4, show_progress=False)
    result = evaluate(conv_model(), images, labels, "proto", inner_steps=0, episodes=4, show_progress=False)
    assert result.accuracies.shape == (4,)  # proto takes no SGD step: inner_steps does not matter


def test_numpy_integers_are_accepted_as_sizes():
    images, labels = clusters(noise=0.1)
    result = evaluate(conv_model(), images, labels, "proto", ways=np.int64(5), shots=np.int32(1), episodes=4,
                      show_progress=False)
    assert "5-way 1-shot" in str(result)
    sampler = EpisodeSampler(labels, np.int64(3), np.int64(2), np.int64(4), seed=0)
    episodes = sampler.sample(images, 2)
    assert episodes.support.shape[:2] == (2, 6) and episodes.query.shape[:2] == (2, 12)
