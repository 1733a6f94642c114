"""The layer plan: parsing, validation messages, roles, segments and KV accounting."""

import pytest

from lckv_vllm.plan import LayerPlan, LayerPlanError, pattern


def segs(plan):
    return [(s.start, s.end, s.cyclic) for s in plan.segments]


def test_w2_roles_and_segments():
    s = pattern("w2", 22)
    assert s == "0_" + "_".join(["20"] * 20) + "_21"
    p = LayerPlan.parse(s, 22)
    assert p.producers == (0, 20, 21)
    assert segs(p) == [(0, 1, False), (1, 21, True), (21, 22, False)]
    assert [r.attends_top for r in p.roles] == [False] + [True] * 19 + [False, False]
    assert [r.strict for r in p.roles] == [False] + [True] * 19 + [False, False]
    assert p.num_passes == 9 and p.is_cyclic
    assert p.kv_bytes_per_token(4, 64, 2) == 3 * 2 * 4 * 64 * 2
    assert p.full_kv_bytes_per_token(4, 64, 2) == 22 * 2 * 4 * 64 * 2


def test_w10_force_nodiag_makes_every_layer_strict():
    s = "0_1_2_3_4_" + "_".join(["16"] * 12) + "_17_18_19_20_21"
    p = LayerPlan.parse(s, 22, force_nodiag=True)
    assert p.producers == (0, 1, 2, 3, 4, 16, 17, 18, 19, 20, 21)
    assert all(r.strict for r in p.roles)
    assert [r.attends_top for r in p.roles] == [False] * 5 + [True] * 11 + [False] * 6
    assert segs(p) == [(0, 5, False), (5, 17, True), (17, 22, False)]
    assert pattern("w10", 22) == s


def test_sandwich_plan_has_one_cyclic_middle_segment():
    s = "0_" + "_".join(["10"] * 20) + "_21"
    p = LayerPlan.parse(s, 22)
    assert segs(p) == [(0, 1, False), (1, 11, True), (11, 22, False)]
    assert p.producers == (0, 10, 21)
    assert not p.roles[15].strict and p.roles[5].strict
    assert pattern("sandwich", 22) == s


def test_cla_yoco_identity_are_acyclic():
    cla = LayerPlan.parse("0_0_2_2_4_4", 6)
    assert cla.producers == (0, 2, 4) and not cla.is_cyclic and segs(cla) == [(0, 6, False)]
    assert not any(r.strict for r in cla.roles)
    yoco = LayerPlan.parse("0s_1s_2s_2_2_2", 6, sliding_window=8)
    assert yoco.producers == (0, 1, 2) and not yoco.is_cyclic
    assert [yoco.window(i) for i in range(6)] == [8, 8, 8, None, None, None]
    ident = LayerPlan.parse(None, 4)
    assert ident.layer_types == "0_1_2_3" and ident.is_identity and ident.producers == (0, 1, 2, 3)
    assert ident.kv_ratio == 1.0


def test_lasagna_top_three_cyclic_segments():
    p = LayerPlan.parse("1_1_3_3_5_5", 6)
    assert segs(p) == [(0, 2, True), (2, 4, True), (4, 6, True)]
    assert p.producers == (1, 3, 5)
    assert [r.kind for r in p.roles] == ["consumer", "producer"] * 3


def test_producer_that_reads_another_layer_is_not_a_chain():
    # layer 1 computes KV (layer 2 reads it) but its own queries read layer 3: it owns pages, reads elsewhere
    p = LayerPlan.parse("0_3_1_3", 4)
    assert p.roles[1].kind == "producer+reader"
    assert p.kv_owner(2) == 1 and p.roles[p.kv_owner(2)].computes_kv
    assert segs(p) == [(0, 1, False), (1, 4, True)]


@pytest.mark.parametrize(
    "layer_types, n, kw, message",
    [
        ("0_1_2", 4, {}, "has 3 entries but num_hidden_layers is 4"),
        ("0_1_7_3", 4, {}, "entry 2 is '7', but there are only 4 layers"),
        ("0_1_x_3", 4, {}, "entry 2 is 'x'"),
        ("0_1_-1_3", 4, {}, "entry 2 is '-1'"),
        ("0_1__3", 4, {}, "entry 2 is ''"),
        ("0_1_2s_3", 4, {}, "sliding_window: layer_types entry 2"),
        ("0_1_2_3", 4, {"forward_passes": 0}, "forward_passes"),
        (["0", "1"], 2, {}, "expected a string"),
    ],
)
def test_invalid_layer_types_name_the_problem(layer_types, n, kw, message):
    with pytest.raises(LayerPlanError) as e:
        LayerPlan.parse(layer_types, n, **kw)
    assert message in str(e.value)


def test_describe_mentions_ratio():
    text = LayerPlan.parse(pattern("w2", 6), 6).describe()
    assert "3/6 = 0.5000" in text and "[1,5) cyclic" in text
