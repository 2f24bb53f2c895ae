"""vLLM-version glue that needs no engine."""

from steer_actors.vllm_compat import keep_off_multicast


def test_a_host_without_nvlink_multicast_never_gets_it_through_the_fused_all_reduce():
    env = {"NCCL_NVLS_ENABLE": "0"}
    keep_off_multicast(env)
    assert env["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] == "trtllm"  # not vLLM's own pick, "mnnvl" (multicast)
    chosen = {"NCCL_NVLS_ENABLE": "0", "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "mnnvl"}
    keep_off_multicast(chosen)
    assert chosen["VLLM_FLASHINFER_ALLREDUCE_BACKEND"] == "mnnvl"  # the user's choice stands
    elsewhere = {}
    keep_off_multicast(elsewhere)
    assert elsewhere == {}  # hosts that allow multicast keep vLLM's default
