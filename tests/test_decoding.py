"""Decoding: beam search against exhaustive search on the 60-token vocabulary, sampling's
reproducibility and its limits, and the logits shaping against transformers' processors."""
import pytest
import torch

from furnace.model.decoding import generate, shape_logits
from test_model_flamingo import IMG, V, make_batch, make_model, set_gates


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = make_model().eval()
    set_gates(model, 0.5)  # the image matters
    batch = make_batch([[1, IMG, 2, 3]], t_img=1)
    return model, batch


def _exhaustive(model, batch, eos, length_penalty):
    """Every continuation of 1 (EOS alone) or 2 tokens, scored by teacher forcing."""
    ids, images, valid = batch["input_ids"], batch["images"], batch["media_valid"]
    with torch.no_grad():
        first = model.logits({"input_ids": ids, "images": images, "media_valid": valid})[0, -1]
        first[IMG] = float("-inf")
        lp1 = first.log_softmax(-1)
        rows = torch.cat([ids.expand(V, -1), torch.arange(V).masked_fill(torch.arange(V) == IMG, 0)[:, None]], dim=1)
        second = model.logits({"input_ids": rows, "images": images.expand(V, *images.shape[1:]),
                               "media_valid": valid.expand(V, -1)})[:, -1]
        second[:, IMG] = float("-inf")
        lp2 = second.log_softmax(-1)
    best = ([eos], float(lp1[eos]) / 1 ** length_penalty)
    total = lp1[:, None] + lp2
    for t1 in range(V):
        if t1 in (eos, IMG):
            continue
        t2 = int(total[t1].argmax())
        score = float(total[t1, t2]) / 2 ** length_penalty
        if score > best[1]:
            best = ([t1, t2], score)
    return best[0]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_beam_search_with_every_prefix_kept_is_exhaustive_search(setup, length_penalty):
    model, batch = setup
    greedy = model.generate(batch["input_ids"], None, batch["images"], batch["media_valid"], max_new_tokens=2)
    eos = int(greedy[0, 0])  # the likeliest first token ends the caption: [EOS] alone competes
    want = _exhaustive(model, batch, eos, length_penalty)
    got = model.generate(batch["input_ids"], None, batch["images"], batch["media_valid"], max_new_tokens=2,
                         num_beams=V, eos_token_id=eos, length_penalty=length_penalty)
    assert got[0, : len(want)].tolist() == want, (got, want)
    assert not got[0, len(want):].any()  # padded after a shorter winner


def test_beam_search_batches_and_pads(setup):
    model, _ = setup
    batch = make_batch([[1, IMG, 2, 3], [IMG, 5]], t_img=1)
    both = model.generate(batch["input_ids"], batch["attention_mask"], batch["images"], batch["media_valid"],
                          max_new_tokens=4, num_beams=3)
    for row in range(2):
        alone = model.generate(batch["input_ids"][row:row + 1, : int(batch["attention_mask"][row].sum())], None,
                               batch["images"][row:row + 1], batch["media_valid"][row:row + 1], max_new_tokens=4,
                               num_beams=3)
        assert torch.equal(both[row], alone[0])


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(setup):
    model, batch = setup
    args = (batch["input_ids"], None, batch["images"], batch["media_valid"])

    def sample(seed, **kw):
        return model.generate(*args, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(seed),
                              **kw)

    assert torch.equal(sample(1, temperature=1.5), sample(1, temperature=1.5))
    assert not torch.equal(sample(1, temperature=5.0), sample(2, temperature=5.0))
    assert torch.equal(sample(3, top_k=1), model.generate(*args, max_new_tokens=8))


def test_logits_shaping_matches_transformers_processors():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    seen = torch.randint(0, 40, (3, 6))
    for kw in ({"repetition_penalty": 1.3}, {"temperature": 0.7, "top_k": 5}, {"temperature": 1.2, "top_p": 0.8},
               {"repetition_penalty": 0.8, "temperature": 0.9, "top_k": 12, "top_p": 0.5}):
        got = shape_logits(logits, seen, image_token_id=39, **kw)
        want = logits.clone()
        want[:, 39] = float("-inf")
        if "repetition_penalty" in kw:
            want = RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])(seen, want)
        if "temperature" in kw:
            want = TemperatureLogitsWarper(kw["temperature"])(seen, want)
        if "top_k" in kw:
            want = TopKLogitsWarper(kw["top_k"])(seen, want)
        if "top_p" in kw:
            want = TopPLogitsWarper(kw["top_p"])(seen, want)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), kw
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-6), kw


def test_beam_search_with_sampling_or_no_new_token_is_refused(setup):
    model, batch = setup
    with pytest.raises(ValueError, match="beam search with sampling"):
        generate(model, batch["input_ids"], None, batch["images"], batch["media_valid"], num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="at least 1 new token"):
        generate(model, batch["input_ids"], None, batch["images"], batch["media_valid"], max_new_tokens=0)


def test_a_stop_check_ends_each_row_where_it_says(setup):
    """`stop` marks rows done (then padded); the others run on to max_new_tokens."""
    model, _ = setup
    batch = make_batch([[1, IMG, 2, 3], [IMG, 5]], t_img=1)
    args = (batch["input_ids"], batch["attention_mask"], batch["images"], batch["media_valid"])
    free = model.generate(*args, max_new_tokens=5, pad_token_id=0)
    stopped = model.generate(*args, max_new_tokens=5, pad_token_id=0,
                             stop=lambda new: (torch.arange(new.shape[0]) == 0) & (new.shape[1] >= 2))
    assert torch.equal(stopped[0, :2], free[0, :2]) and not stopped[0, 2:].any()
    assert torch.equal(stopped[1], free[1])
