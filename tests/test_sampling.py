"""The sort-free nucleus sampler draws from the same distribution as transformers' temperature and
top-p warpers (which sort the vocabulary), and its logits processor keeps the same tokens."""

import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from refine_af_pipeline.llm.sampling import FIRST_K, nucleus_candidates, nucleus_logits_processor, sample_next_tokens

pytestmark = pytest.mark.graph

TEMPERATURE, TOP_P = 0.7, 0.95


def transformers_probs(logits, temperature=TEMPERATURE, top_p=TOP_P):
    """The distribution model.generate samples from: temperature, then top-p, then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    return torch.softmax(TopPLogitsWarper(top_p)(None, scores), dim=-1)


@pytest.fixture(scope="module")
def tiny_logits(tiny_model_dir):
    """Next-token logits of the tiny model after a few prompts: real, peaked and flat rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["<|im_start|>user\nList tasks<|im_end|>\n<|im_start|>assistant\n", "Input: river garden", "9."]
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits[:, -1] for t in texts])


def flat_logits(vocabulary=2000, seed=0):
    """A row whose nucleus holds most of the vocabulary: k must grow far past FIRST_K."""
    return torch.randn(1, vocabulary, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_the_nucleus_is_the_set_transformers_keeps(tiny_logits):
    for logits in (tiny_logits, flat_logits()):
        expected = transformers_probs(logits)
        probs, ids = nucleus_candidates(logits / TEMPERATURE, TOP_P)
        for row in range(logits.shape[0]):
            kept = set(ids[row][probs[row] > 0].tolist())
            assert kept == set(torch.nonzero(expected[row]).flatten().tolist()), row
    _, ids = nucleus_candidates(flat_logits() / TEMPERATURE, TOP_P)
    assert ids.shape[1] > FIRST_K  # the flat row needed a larger k


def test_the_logits_processor_gives_the_transformers_distribution(tiny_logits):
    # The processor takes the raw logits: transformers runs a caller's processors before its own
    # temperature warper, so the processor applies the temperature itself.
    for logits in (tiny_logits, flat_logits()):
        ours = torch.softmax(nucleus_logits_processor(TOP_P, TEMPERATURE)(None, logits.clone()), dim=-1)
        assert torch.allclose(ours, transformers_probs(logits), atol=1e-6)


def test_draws_follow_the_transformers_distribution(tiny_logits):
    """20,000 draws per row, each row's frequencies against (a) the exact distribution, by a
    chi-square test over the tokens with an expected count of 5 or more (the rest pooled), p > 0.001;
    (b) 20,000 draws of transformers' own sampler (softmax + multinomial over the warped logits), by
    total variation distance below 1.5x the distance two samples of one distribution have on
    average (sum over tokens of sqrt(p / (pi n)); 0.01-0.07 for these rows)."""
    from scipy.stats import chisquare

    draws = 20_000
    generator = torch.Generator().manual_seed(1)
    for logits in (tiny_logits, flat_logits(vocabulary=300)):
        expected = transformers_probs(logits)
        for row in range(logits.shape[0]):
            repeated = logits[row : row + 1].expand(draws, -1)
            uniforms = torch.rand(draws, generator=generator)
            ours = torch.bincount(
                sample_next_tokens(repeated, TEMPERATURE, TOP_P, uniforms), minlength=logits.shape[1]
            ).double()
            theirs = torch.bincount(
                torch.multinomial(expected[row], draws, replacement=True, generator=generator),
                minlength=logits.shape[1],
            ).double()
            assert set(torch.nonzero(ours).flatten().tolist()) <= set(torch.nonzero(expected[row]).flatten().tolist())
            counts = expected[row].double() / expected[row].double().sum() * draws
            big = counts >= 5
            observed = torch.cat([ours[big], ours[~big].sum().unsqueeze(0)])
            wanted = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
            if wanted[-1] == 0:
                observed, wanted = observed[:-1], wanted[:-1]
            wanted = wanted * observed.sum() / wanted.sum()  # float32 probabilities sum to 1 +- 1e-7
            assert chisquare(observed.numpy(), wanted.numpy()).pvalue > 1e-3, row
            spread = torch.sqrt(expected[row].double() / (math.pi * draws)).sum().item()
            assert 0.5 * (ours - theirs).abs().sum().item() / draws < 1.5 * spread, (row, spread)


def test_top_p_one_samples_the_whole_vocabulary_and_uniforms_pick_by_cumulative_share():
    # With top_p 0.6 the nucleus is {0, 1} (0.5 is below 0.6, 0.8 reaches it): renormalised 0.625 / 0.375.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    pick = [
        sample_next_tokens(logits, 1.0, 1.0, torch.tensor([u])).item() for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)
    ]
    assert pick == [0, 0, 1, 1, 2, 2]
    pick = [sample_next_tokens(logits, 1.0, 0.6, torch.tensor([u])).item() for u in (0.6, 0.63, 0.999)]
    assert pick == [0, 1, 1]
    # A token of probability 0 is never drawn, also where it sits last in vocabulary order.
    gapped = torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    pick = [sample_next_tokens(gapped, 1.0, 1.0, torch.tensor([u])).item() for u in (0.0, 0.6, 0.99999994)]
    assert pick == [1, 2, 2]
