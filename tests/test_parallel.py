"""vLLM's own parallelism with cross-layer sharing: tensor parallel (KV heads split across ranks, consumers read
their rank's pages of their producer) and pipeline parallel (stages cut only where no reader is separated from its
producer), each exact against the reference for a cyclic and an acyclic plan; partition validation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lckv_vllm.plan import LayerPlan, LayerPlanError, pattern

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("preset,tp,pp", [("tiny-w2", 2, 1), ("tiny-cla", 2, 1), ("tiny-w2", 1, 2),
                                          ("tiny-cla", 1, 2)])
def test_parallel_engine_matches_reference(preset, tp, pp, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "parallel_run.py"), preset, str(tmp_path), "--tp", str(tp),
                        "--pp", str(pp)], capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(lines[-1])
    print(res)
    assert res["same_tokens"] and res["max_dlogprob"] < 1e-3, res
    assert res["thread_bind"] == "0|1"  # set by the plugin: two workers, one core each


def test_pipeline_stages_follow_the_plan():
    w2 = LayerPlan.parse(pattern("w2", 22))  # 0_20x20_21: layers 1..20 read layer 20
    assert w2.valid_cuts() == [1, 21]
    assert w2.pipeline_stages(2) == ((0, 1), (1, 22))
    assert w2.pipeline_stages(3) == ((0, 1), (1, 21), (21, 22))
    ident = LayerPlan.parse(pattern("identity", 8))
    assert ident.pipeline_stages(2) == ((0, 4), (4, 8)) and ident.pipeline_stages(3) == ((0, 2), (2, 5), (5, 8))
    cla = LayerPlan.parse("0_0_2_2_4_4_6_6")
    assert cla.pipeline_stages(2) == ((0, 4), (4, 8)) and cla.pipeline_stages(2, [2, 6]) == ((0, 2), (2, 8))


def test_partition_that_cuts_a_cyclic_segment_is_refused():
    with pytest.raises(LayerPlanError, match=r"cut between layers 2 and 3 .*layer 1 reads layer 4.*cyclic segment "
                                             r"\[1,5\).*valid cuts .*before layers \[1, 5\]"):
        LayerPlan.parse("0_4_4_4_4_5").pipeline_stages(2, [3, 3])


def test_partition_that_splits_a_producer_from_its_reader_is_refused():
    with pytest.raises(LayerPlanError, match="layer 3 reads layer 2"):
        LayerPlan.parse("0_0_2_2_4_4").pipeline_stages(2, [3, 3])  # acyclic, but 3 reads 2 across the cut
    with pytest.raises(LayerPlanError, match="at most 3 stages"):
        LayerPlan.parse("0_4_4_4_4_5").pipeline_stages(4)
    with pytest.raises(LayerPlanError, match="needs 2 positive sizes adding up to 6"):
        LayerPlan.parse("0_4_4_4_4_5").pipeline_stages(2, [1, 4])
