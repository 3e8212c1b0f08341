"""Which decode batches the decode graphs take, and the settings they refuse.

Their greedy parity with transformers is in test_engine_correctness
(``test_decode_graphs_match_hf``)."""
import numpy as np
import pytest
import torch

from orca_serve.config import EngineConfig
from orca_serve.sampling_params import SamplingParams
from orca_serve.worker.decode_graphs import GATHER_SLACK, DecodeGraphs, bucket_sizes
from orca_serve.worker.input_batch import RequestState


def graphs(max_batch=256, max_context=2048, block_size=16, paged=False):
    return DecodeGraphs(model=None, kv_blocks=100, block_size=block_size, max_batch=max_batch,
                        max_context=max_context, device=torch.device("cpu"), capture=False, paged=paged)


def test_bucket_sizes():
    assert bucket_sizes(256, half_steps_from=8) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert bucket_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert bucket_sizes(100, half_steps_from=8)[-3:] == [64, 96, 100]
    assert bucket_sizes(1) == [1]


def test_bucket_rounds_batch_and_blocks_up():
    g = graphs()
    # 5 decodes, the longest 70 tokens (5 blocks of 16): 8 rows x 8 blocks.
    assert g.bucket(np.array([70, 60, 50, 40, 65])) == (8, 8)
    assert g.bucket(np.array([1])) == (1, 1)
    assert g.bucket(np.full(256, 2048)) == (256, 128)


def test_bucket_refuses_what_a_graph_cannot_or_should_not_serve():
    g = graphs(max_batch=8, max_context=256)
    assert g.bucket(np.array([], dtype=np.int64)) is None
    assert g.bucket(np.full(9, 10)) is None  # more decodes than the largest batch bucket
    assert g.bucket(np.array([257])) is None  # a context past max_model_len's blocks
    # One long context among short ones: every row would gather its 16 blocks.
    lens = np.array([256, 16, 16, 16, 16, 16, 16, 16])
    assert 8 * 16 > GATHER_SLACK * (16 + 7)
    assert g.bucket(lens) is None
    g.disabled_reason = "capture failed"
    assert g.bucket(np.array([16])) is None


def test_with_the_paged_kernel_no_mix_of_lengths_is_refused():
    """The kernel reads each context up to its length: padding costs nothing
    to gather, so one long context among short ones still takes a graph."""
    g = graphs(max_batch=8, max_context=256, paged=True)
    assert g.bucket(np.array([70, 60, 50, 40, 65])) == (8, 8)
    assert g.bucket(np.array([256, 16, 16, 16, 16, 16, 16, 16])) == (8, 16)
    assert g.bucket(np.array([257])) is None and g.bucket(np.full(9, 10)) is None


def test_capture_failure_switches_graphs_off_and_the_step_runs_eagerly(monkeypatch):
    g = graphs(max_batch=4, max_context=64)
    g.capture = True
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    request = RequestState(req_id="r", token_ids=[1, 2, 3, 5], num_prompt_tokens=3, block_ids=[7],
                           num_computed_tokens=3, sampling_params=SamplingParams())
    assert g.logits(np.array([5]), np.array([3]), [request], (1, 1)) is None
    assert "capturing bucket (1, 1) failed: RuntimeError: no CUDA" in g.disabled_reason
    assert g.bucket(np.array([4])) is None and g.num_steps == 0


def test_gpu_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA GPU, but device is 'cpu'"):
        EngineConfig.from_kwargs(cuda_graphs=True, device="cpu")
    with pytest.raises(ValueError, match="triton_decode needs the model on a CUDA GPU, but device is 'cpu'"):
        EngineConfig.from_kwargs(triton_decode="on", device="cpu")
    with pytest.raises(ValueError, match="triton_decode must be one of auto, on, off"):
        EngineConfig.from_kwargs(triton_decode="yes")
    with pytest.raises(ValueError, match="cuda_graphs runs on one rank only; tensor x pipeline parallel size is 2"):
        EngineConfig.from_kwargs(cuda_graphs=True, tensor_parallel_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_cuda_graphs_without_a_gpu_is_a_clear_error(tiny_model_dir):
    from orca_serve.engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA GPU; it is on cpu"):
        LLMEngine(EngineConfig.from_kwargs(model=tiny_model_dir("llama"), cuda_graphs=True, num_kv_blocks=16))
