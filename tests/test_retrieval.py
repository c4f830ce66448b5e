"""Tests for benchmark.retrieval: ranks with multi-caption semantics and recall@K."""

import itertools
import math
import random

import pytest
import torch

from benchmark.retrieval import RetrievalRanks, hits_at_k, recall_at_k, retrieval_ranks

# ----------------------------------------------------------------------------------------
# A hand-built gallery. Images are one-hot, so S[x, c] is simply coordinate x of caption c
# and every score can be read off the caption vectors below.
#
#   caption:          c0  c1  c2  c3  c4
#   its image:         0   0   1   2   2
#   S[image 0, :] =    3   1   0   2   0
#   S[image 1, :] =    0   2   1   0   3
#   S[image 2, :] =    1   0   2   1   2
#
# image -> text (count captions strictly above each true caption, keep the min; ranks.i2t is
# that count, the tie-aware recall below uses the tie counts beside it):
#   image 0: c0 has 3 -> 0 above; c1 has 1 -> 2 above (3, 2)     => rank 0
#   image 1: c2 has 1 -> 2 above (2, 3)                          => rank 2
#   image 2: c3 has 1 -> 2 above (2, 2); c4 has 2 -> 0 above
#            (c2 also scores 2: a tie, which counts for the query) => rank 0, from its
#            SECOND caption, so "min over captions" is really exercised.
# text -> image (count images strictly above the true image in the caption's column):
#   c0: column (3,0,1), true 3 -> 0        c1: column (1,2,0), true 1 -> 1
#   c2: column (0,1,2), true 1 -> 1        c3: column (2,0,1), true 1 -> 1
#   c4: column (0,3,2), true 2 -> 1
# ----------------------------------------------------------------------------------------
HAND_IMAGES = torch.eye(3)
HAND_TEXTS = torch.tensor(
    [
        [3.0, 0.0, 1.0],
        [1.0, 2.0, 0.0],
        [0.0, 1.0, 2.0],
        [2.0, 0.0, 1.0],
        [0.0, 3.0, 2.0],
    ]
)
HAND_TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2, 2])
HAND_I2T = [0, 2, 0]
HAND_T2I = [0, 1, 1, 1, 1]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_hand_built_ranks(chunk_size):
    ranks = retrieval_ranks(HAND_IMAGES, HAND_TEXTS, HAND_TEXT_TO_IMAGE, chunk_size=chunk_size)
    assert isinstance(ranks, RetrievalRanks)
    assert ranks.i2t.tolist() == HAND_I2T
    assert ranks.t2i.tolist() == HAND_T2I
    assert ranks.i2t.dtype == torch.long and ranks.t2i.dtype == torch.long
    assert ranks.i2t.device.type == "cpu"


def test_hand_built_recalls():
    ranks = retrieval_ranks(HAND_IMAGES, HAND_TEXTS, HAND_TEXT_TO_IMAGE)
    # i2t ranks (0, 2, 0): 2 of 3 within top-1 and top-2, all 3 within top-3.
    assert recall_at_k(ranks.i2t, ks=(1, 2, 3)) == pytest.approx({1: 200 / 3, 2: 200 / 3, 3: 100.0})
    # t2i ranks (0, 1, 1, 1, 1): 1 of 5 at top-1, all within top-2.
    assert recall_at_k(ranks.t2i, ks=(1, 2)) == pytest.approx({1: 20.0, 2: 100.0})


# ----------------------------------------------------------------------------------------
# Brute force reference: plain Python, sorting each row. The features are small integers,
# so every score is an exact integer whatever the summation order, and ties are exact.
# ----------------------------------------------------------------------------------------


def brute_force_ranks(images, texts, text_to_image):
    images, texts, owner = images.tolist(), texts.tolist(), text_to_image.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def position_in_sorted(row, value):
        # Index of the first occurrence of `value` in the row sorted best-first: the
        # number of items strictly better, so ties go to the query.
        return sorted(row, reverse=True).index(value)

    i2t = []
    for x, image in enumerate(images):
        row = [dot(image, text) for text in texts]
        true_captions = [c for c in range(len(texts)) if owner[c] == x]
        i2t.append(min(position_in_sorted(row, row[c]) for c in true_captions))

    t2i = []
    for c, text in enumerate(texts):
        column = [dot(image, text) for image in images]
        t2i.append(position_in_sorted(column, column[owner[c]]))
    return i2t, t2i


def random_gallery(seed, n_images, captions_per_image, dim=6, duplicates=True):
    """Integer features in [-2, 2], with some images and captions duplicated to force ties."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    counts = [captions_per_image(rng) for _ in range(n_images)]
    text_to_image = torch.tensor([x for x, count in enumerate(counts) for _ in range(count)])
    # Shuffle so captions of one image are not contiguous (real annotation files are not).
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=generator)]
    images = torch.randint(-2, 3, (n_images, dim), generator=generator).float()
    texts = torch.randint(-2, 3, (len(text_to_image), dim), generator=generator).float()
    if duplicates:
        for _ in range(max(1, n_images // 4)):
            images[rng.randrange(n_images)] = images[rng.randrange(n_images)]
        for _ in range(max(1, len(texts) // 4)):
            texts[rng.randrange(len(texts))] = texts[rng.randrange(len(texts))]
    return images, texts, text_to_image


CAPTION_COUNTS = {
    "one": lambda rng: 1,
    "five": lambda rng: 5,
    "one_or_five": lambda rng: rng.choice([1, 5]),
    "one_to_four": lambda rng: rng.randint(1, 4),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("counts", sorted(CAPTION_COUNTS))
def test_matches_brute_force(seed, counts):
    images, texts, text_to_image = random_gallery(seed, n_images=23, captions_per_image=CAPTION_COUNTS[counts])
    expected_i2t, expected_t2i = brute_force_ranks(images, texts, text_to_image)
    for chunk_size in (1, 3, 7, len(texts) + 5):
        ranks = retrieval_ranks(images, texts, text_to_image, chunk_size=chunk_size)
        assert ranks.i2t.tolist() == expected_i2t, f"i2t, chunk_size={chunk_size}"
        assert ranks.t2i.tolist() == expected_t2i, f"t2i, chunk_size={chunk_size}"


def test_random_galleries_contain_ties():
    # Guards the test above: the tie rule is only exercised if equal scores occur
    # between a true item and a competitor.
    images, texts, text_to_image = random_gallery(0, 23, CAPTION_COUNTS["one_to_four"])
    scores = images @ texts.T
    true_scores = scores[text_to_image, torch.arange(len(texts))]
    competitors_tied = (scores == true_scores).sum(dim=0) - 1  # minus the true image itself
    assert int(competitors_tied.sum()) > 0


def test_ranks_count_only_items_strictly_above_and_ties_apart():
    # Two identical images: a caption of either has 0 images above its own and 1 tied with it,
    # so its expected R@1 is 1/2 (the optimistic rule would give 1).
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 1, 2]))
    assert ranks.t2i.tolist() == [0, 0, 0] and ranks.t2i_tied.tolist() == [1, 1, 0]
    assert ranks.i2t.tolist() == [0, 0, 0] and ranks.i2t_tied.tolist() == [1, 1, 0]
    assert ranks.recall("t2i", ks=(1,))[1] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert ranks.recall("t2i", ks=(1,), tie_rule="optimistic")[1] == 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_brute_force(dtype):
    # Small integers are exact in fp16 and bf16, so the reference is unchanged.
    images, texts, text_to_image = random_gallery(5, 17, CAPTION_COUNTS["one_or_five"])
    expected_i2t, expected_t2i = brute_force_ranks(images, texts, text_to_image)
    ranks = retrieval_ranks(images.to(dtype), texts.to(dtype), text_to_image, chunk_size=4)
    assert ranks.i2t.tolist() == expected_i2t
    assert ranks.t2i.tolist() == expected_t2i


def test_half_precision_scores_are_computed_in_float32():
    # Both scores (80000 and 79600) overflow float16 to inf and would tie there, giving
    # the caption of image 1 rank 0; in float32 image 0 is strictly better, so rank 1.
    images = torch.tensor([[200.0] * 4, [199.0] * 4], dtype=torch.float16)
    texts = torch.tensor([[100.0] * 4, [100.0] * 4], dtype=torch.float16)
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 1]))
    assert ranks.t2i.tolist() == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_brute_force():
    images, texts, text_to_image = random_gallery(3, 40, CAPTION_COUNTS["one_to_four"])
    expected_i2t, expected_t2i = brute_force_ranks(images, texts, text_to_image)
    ranks = retrieval_ranks(images.cuda().half(), texts.cuda().half(), text_to_image.cuda(), chunk_size=8)
    assert ranks.i2t.device.type == "cpu" and ranks.t2i.device.type == "cpu"
    assert ranks.i2t.tolist() == expected_i2t
    assert ranks.t2i.tolist() == expected_t2i


# ---------------------------------------------------------------------------------- recall


def test_recall_with_mask():
    ranks = torch.tensor([0, 3, 7, 12, 0, 4])
    # All six: rank < 1 -> 2/6, < 5 -> 4/6, < 10 -> 5/6.
    assert recall_at_k(ranks) == pytest.approx({1: 100 * 2 / 6, 5: 100 * 4 / 6, 10: 100 * 5 / 6})
    # Selected ranks 3, 7, 12, 4: < 1 -> 0/4, < 5 -> 2/4, < 10 -> 3/4.
    mask = torch.tensor([False, True, True, True, False, True])
    assert recall_at_k(ranks, mask=mask) == pytest.approx({1: 0.0, 5: 50.0, 10: 75.0})
    assert list(recall_at_k(ranks, ks=(10, 1))) == [10, 1]


def test_recall_rejects_empty_selection_and_bad_masks():
    ranks = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="no query"):
        recall_at_k(ranks, mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no query"):
        recall_at_k(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="boolean"):
        recall_at_k(ranks, mask=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="boolean"):
        recall_at_k(ranks, mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(ranks, ks=(0,))


# ------------------------------------------------------------------------------ validation


def test_rejects_image_without_caption():
    with pytest.raises(ValueError, match="images without one: 1"):
        retrieval_ranks(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 2]))


@pytest.mark.parametrize(
    "images, texts, text_to_image, message",
    [
        (torch.eye(2), torch.eye(2), torch.tensor([0, 2]), "only 2 images"),
        (torch.eye(2), torch.eye(2), torch.tensor([0, -1]), "only 2 images"),
        (torch.eye(2), torch.eye(2), torch.tensor([0]), "shape"),
        (torch.eye(2), torch.ones(2, 3), torch.tensor([0, 1]), "widths"),
        (torch.eye(2), torch.eye(2), torch.tensor([0.0, 1.0]), "integer"),
    ],
)
def test_rejects_inconsistent_inputs(images, texts, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        retrieval_ranks(images, texts, text_to_image)


def test_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_ranks(HAND_IMAGES, HAND_TEXTS, HAND_TEXT_TO_IMAGE, chunk_size=0)


# ------------------------------------------------------------------------ broken features and ties


def test_nan_features_are_an_error_not_a_perfect_score():
    # The review's reproduction: before, every NaN comparison was false, so R@1 came out 100 %.
    with pytest.raises(ValueError, match="100 of 100 image feature vectors are not finite"):
        retrieval_ranks(torch.full((100, 8), float("nan")), torch.randn(500, 8),
                        torch.arange(100).repeat_interleave(5))
    texts = torch.randn(6, 4)
    texts[2, 1] = float("inf")
    with pytest.raises(ValueError, match="1 of 6 text feature vectors"):
        retrieval_ranks(torch.randn(3, 4), texts, torch.arange(3).repeat_interleave(2))


def test_constant_features_score_chance():
    # A collapsed model: every score ties. 100 images x 5 captions.
    #   t2i: the true image is uniformly placed among 100 -> R@K = K / 100.
    #   i2t: 5 true captions among 500; P(none of the first K is true) = C(495, K) / C(500, K).
    ranks = retrieval_ranks(torch.ones(100, 8), torch.ones(500, 8), torch.arange(100).repeat_interleave(5))
    for k in (1, 5, 10):
        assert ranks.recall("t2i", ks=(k,))[k] == pytest.approx(100 * k / 100)
        expected_i2t = 100 * (1 - math.comb(495, k) / math.comb(500, k))
        assert ranks.recall("i2t", ks=(k,))[k] == pytest.approx(expected_i2t)
    # The optimistic rule, kept by name, is the old behaviour (and the reason it is not the default).
    assert ranks.recall("t2i", tie_rule="optimistic") == {1: 100.0, 5: 100.0, 10: 100.0}


def brute_force_expected_recall(images, texts, text_to_image, k):
    """Expected hit@K per query, averaged over every order of the gallery: sorting a permuted
    gallery stably by score is a uniformly random order of the tied items."""
    images, texts, owner = images.tolist(), texts.tolist(), text_to_image.tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def expected_hit(scores, is_true):
        orders = list(itertools.permutations(range(len(scores))))
        hits = 0
        for order in orders:
            ranked = sorted(order, key=lambda i: -scores[i])  # stable: ties keep the permuted order
            hits += any(is_true[i] for i in ranked[:k])
        return hits / len(orders)

    i2t = [expected_hit([dot(x, t) for t in texts], [owner[c] == n for c in range(len(texts))])
           for n, x in enumerate(images)]
    t2i = [expected_hit([dot(x, t) for x in images], [owner[c] == n for n in range(len(images))])
           for c, t in enumerate(texts)]
    return i2t, t2i


@pytest.mark.parametrize("seed", range(6))
def test_expected_tie_rule_matches_averaging_over_every_order(seed):
    # Features in {0, 1}: scores are small integers with many ties, between true and false
    # items and among an image's own captions.
    generator = torch.Generator().manual_seed(seed)
    text_to_image = torch.tensor([0, 1, 1, 2, 3, 3])[torch.randperm(6, generator=generator)]
    images = torch.randint(0, 2, (4, 3), generator=generator).float()
    texts = torch.randint(0, 2, (6, 3), generator=generator).float()
    ranks = retrieval_ranks(images, texts, text_to_image)
    for k in (1, 2, 3):
        i2t, t2i = brute_force_expected_recall(images, texts, text_to_image, k)
        assert ranks.recall("i2t", ks=(k,))[k] == pytest.approx(100 * sum(i2t) / len(i2t))
        assert ranks.recall("t2i", ks=(k,))[k] == pytest.approx(100 * sum(t2i) / len(t2i))
        tied, tied_true = ranks.ties("i2t")
        per_query = hits_at_k(ranks.i2t, k, tied=tied, tied_true=tied_true)
        assert per_query.tolist() == pytest.approx(i2t)


def test_tie_counts_by_hand():
    # Image 0 has captions c0 (score 1) and c1 (score 1); c2 and c3 (other images) score 1 too,
    # c4 scores 2. So 1 caption above, 2 non-matching tied, 2 true tied.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 0, 1, 2, 2]))
    assert (int(ranks.i2t[0]), int(ranks.i2t_tied[0]), int(ranks.i2t_tied_true[0])) == (1, 2, 2)
    # hit@2: one free place after the one above; P(it holds a non-matching item) = 2/4.
    assert float(hits_at_k(ranks.i2t[:1], 2, tied=ranks.i2t_tied[:1], tied_true=ranks.i2t_tied_true[:1])) == 0.5
    # hit@3: two free places, both non-matching with probability (2/4)(1/3) = 1/6.
    assert float(hits_at_k(ranks.i2t[:1], 3, tied=ranks.i2t_tied[:1],
                           tied_true=ranks.i2t_tied_true[:1])) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="tie_rule"):
        recall_at_k(ranks.i2t, tie_rule="pessimistic")


def test_scores_that_overflow_float32_are_an_error():
    # Finite features whose product overflows: inf - inf gives a NaN score, which would be
    # neither above nor tied and leave the truth on top.
    images = torch.tensor([[1e30, 1e30], [0.0, 1.0]])
    texts = torch.tensor([[1e30, -1e30], [0.0, 1.0]])
    with pytest.raises(ValueError, match="scores are not finite"):
        retrieval_ranks(images, texts, torch.tensor([0, 1]))
