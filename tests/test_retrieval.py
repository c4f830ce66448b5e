"""Tests for benchmark.retrieval: ranks with multi-caption semantics and recall@K."""

import random

import pytest
import torch

from benchmark.retrieval import RetrievalRanks, recall_at_k, retrieval_ranks

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
# image -> text (count captions strictly above each true caption, keep the min):
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


def test_ties_count_in_query_favour():
    # Two identical images: a caption of either ranks its image at 0, not 1.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 1, 2]))
    assert ranks.t2i.tolist() == [0, 0, 0]
    assert ranks.i2t.tolist() == [0, 0, 0]


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
