"""Teacher outputs: vLLM's logprobs turned into the top-k columns of the sample schema."""

from vllm.logprobs import FlatLogprobs

from avocado_ray.teachers.replica import topk_at_position


def test_topk_is_ranked_and_free_of_the_repeated_sampled_token():
    flat = FlatLogprobs(
        start_indices=[0, 3], end_indices=[3, 6], token_ids=[7, 7, 9, 5, 1, 2],
        logprobs=[-1.0, -1.0, -2.0, -3.0, -0.5, -0.7], ranks=[1, 1, 2, 3, 1, 2],
    )
    # sampled token 7 is also the top-1: it appears once in the top-k
    assert topk_at_position(flat, 0, sampled=7, k=2) == (-1.0, [7, 9], [-1.0, -2.0])
    # sampled token 5 is outside the top-2: its logprob is kept, the top-k is the best two
    assert topk_at_position(flat, 1, sampled=5, k=2) == (-3.0, [1, 2], [-0.5, -0.7])
