"""The copying-layer measurement (`ucm.copy_layers`): the score against a loop over positions,
the layer rule, the per-model JSON key, the settings `ucm eval` runs with it, and the score of
the real SmolLM2 (its copying heads sit in layers 17 and 18)."""

from __future__ import annotations

import pytest
import torch

from ucm.config.errors import ConfigError
from ucm.config.loader import load_model_config, model_config_data
from ucm.copy_layers import COPY_THRESHOLD, choose_copy_layers, induction_scores_from_attention
from ucm.eval.runner import settings_grid
from ucm.methods import copy_layer_budget_keys, copy_layer_keys, copy_layer_ratios
from ucm.sparse.gsa_on_device import ratios_with_mean


def _loop_scores(att: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(att.shape[:2])
    for layer in range(att.shape[0]):
        for head in range(att.shape[1]):
            vals = [float(att[layer, head, i, i - n + 1]) for i in range(n + 1, 2 * n)]
            out[layer, head] = sum(vals) / len(vals)
    return out


def test_the_score_is_the_mean_attention_to_the_token_after_the_earlier_occurrence() -> None:
    n = 7
    att = torch.rand(3, 2, 2 * n, 2 * n, generator=torch.Generator().manual_seed(1)).tril()
    att = att / att.sum(-1, keepdim=True)
    torch.testing.assert_close(induction_scores_from_attention(att, n), _loop_scores(att, n))
    planted = torch.zeros(1, 2, 2 * n, 2 * n)
    for i in range(2 * n):  # head 0 copies from the earlier occurrence's successor, head 1 attends to itself
        planted[0, 0, i, i - n + 1 if i > n else i] = 1.0
        planted[0, 1, i, i] = 1.0
    assert induction_scores_from_attention(planted, n).tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="layers, heads, 14, 14"):
        induction_scores_from_attention(att[..., :-1], n)


def test_the_rule_takes_the_highest_scores_above_the_threshold_up_to_the_cap() -> None:
    scores = [0.0, 0.9, 0.5, 0.2, 0.95, 0.5, 0.46, 0.44]
    rule = {"threshold": 0.45}
    assert choose_copy_layers(scores, max_fraction=0.25, **rule) == [1, 4]  # cap: a quarter of 8 layers
    assert choose_copy_layers(scores, max_fraction=0.5, **rule) == [1, 2, 4, 5]  # ties: the lower layer first
    assert choose_copy_layers(scores, max_fraction=1.0, **rule) == [1, 2, 4, 5, 6]
    assert choose_copy_layers(scores, max_fraction=0.5, exclude={4}, **rule) == [1, 2, 5, 6]  # dense: skipped
    assert choose_copy_layers([COPY_THRESHOLD - 0.01] * 8) == []
    assert choose_copy_layers([COPY_THRESHOLD] * 10) == [0, 1, 2]  # the default cap: 30% of the layers


def _json(**extra) -> dict:
    data = model_config_data("SmolLM2-135M-Instruct")  # layers 7, 17, 18, 23 dense
    data.update(extra)
    return data


def test_the_model_json_key_names_sparse_layers_of_the_model_once() -> None:
    assert load_model_config(_json(copy_layers=[20, 21])).config.copy_layers == [20, 21]
    assert load_model_config(_json(copy_layers=None)).config.copy_layers is None
    assert load_model_config(_json()).config.copy_layers == [17, 18, 20, 23]  # measured in session 22
    assert load_model_config(_json(copy_layers=[17, 20])).config.copy_layers == [17, 20]  # 17: dense there
    for bad, why in (([20, 20], "twice"), ([30], "past the last layer")):
        with pytest.raises(ConfigError, match=why):
            load_model_config(_json(copy_layers=bad))


def test_eval_runs_the_copying_layers_as_each_method_takes_them(tmp_path) -> None:
    """ESA and GSA: groups of 2 there; GSA and KVStar: a larger share of the budget there (over
    SmolLM2's 30 layers, the evaluated model's); Quest neither."""
    grid = settings_grid(["ESA", "GSA", "KVStarMultiStep", "Quest"], [0.3], dense_layers=[7], copy_layers=[20, 21])
    assert [s.label for s in grid] == [
        "dense",
        "ESA+dense+copy@0.3",
        "GSA+dense+copy@0.3",
        "KVStarMultiStep+dense+copy@0.3",
        "Quest+dense@0.3",
    ]
    bodies = {s.method: s.extra_config(tmp_path)["ucm_sparse_config"][s.method] for s in grid[1:]}
    budgets = copy_layer_budget_keys(30, [7], [20, 21], 0.3, 5 / 3)["layer_sparse_ratio"]
    assert bodies["GSA"]["layer_sparse_ratio"] == bodies["KVStarMultiStep"]["layer_sparse_ratio"] == budgets
    assert budgets["20"] == 0.5 and len(budgets) == 29
    assert "layer_sparse_ratio" not in bodies["ESA"] and "layer_sparse_ratio" not in bodies["Quest"]
    for setting in grid[1:3]:
        body = setting.extra_config(tmp_path)["ucm_sparse_config"][setting.method]
        assert body["blk_repre_inner_token_merge"] is None
        assert (
            body["layer_repre_inner_token_merge"]
            == {"20": 2, "21": 2}
            == copy_layer_keys([20, 21])["layer_repre_inner_token_merge"]
        )
    kvstar = bodies["KVStarMultiStep"]
    assert "layer_repre_inner_token_merge" not in kvstar and kvstar["blk_repre_inner_token_merge"] != 0
    # keys asked for on the command line say how the layers group: no copy layers then
    keyed = settings_grid(["ESA"], [0.3], copy_layers=[20], method_keys={"blk_repre_inner_token_merge": 4})
    assert keyed[1].copy_layers == () and keyed[1].label == "ESA[blk_repre_inner_token_merge=4]@0.3"
    # a boost asked for would not reach the budgets "+copy" computes: refused, not ignored
    with pytest.raises(ValueError, match="copy_layer_boost"):
        settings_grid(["GSA"], [0.3], copy_layers=[20], method_keys={"copy_layer_boost": 2.0})


def test_smollm2_copies_in_layers_17_and_18(model_path) -> None:
    """The real model: its copying heads (layers 17 and 18, also two of its shipped JSON's dense
    layers) score highest, far above every early layer."""
    from transformers import AutoModelForCausalLM

    from ucm.copy_layers import induction_scores

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    scores = induction_scores(model.eval(), length=128, sequences=1)
    assert scores.shape == (30,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert sorted(scores.argsort(descending=True)[:2].tolist()) == [17, 18]
    assert float(scores[17:19].min()) > 0.6 and float(scores[:17].max()) < 0.05


def test_the_shipped_smollm2_json_names_the_measured_copying_layers(model_path) -> None:
    """`configs/smollm2_135m.json`'s `copy_layers` are what `ucm configure` measures and picks
    (17 and 18 at ~0.8-0.9, 20 and 23 at ~0.39; 17, 18 and 23 are also its dense layers)."""
    from ucm.configure import measure_induction

    shipped = load_model_config("SmolLM2-135M-Instruct").config.copy_layers
    assert shipped == choose_copy_layers(measure_induction(model_path)) == [17, 18, 20, 23]


# ---------------------------------------------------------------- the copying layers' per-layer budgets
def test_copying_layers_take_a_larger_share_of_the_same_budget() -> None:
    # Qwen2.5-Coder-0.5B's shipped layout: dense 0, 3, 7; seven copying layers
    got = copy_layer_ratios(24, [0, 3, 7], [9, 11, 13, 16, 19, 21, 23], 0.3)
    sparse = [r for i, r in enumerate(got) if i not in (0, 3, 7)]
    assert [got[i] for i in (0, 3, 7)] == [1.0] * 3
    assert {got[i] for i in (9, 11, 13, 16, 19, 21, 23)} == {0.5} and set(sparse) == {0.5, 0.2}
    assert sum(sparse) / len(sparse) == pytest.approx(0.3)  # the blocks read do not change
    # a dense copying layer reads every block already: it takes no share
    assert copy_layer_ratios(4, [1], [1], 0.3) == [0.3, 1.0, 0.3, 0.3]
    assert copy_layer_ratios(4, [], [], 0.3) == [0.3] * 4
    # most layers copying: the rest keep a third of the mean, the copying layers share what is left
    many = copy_layer_ratios(4, [], [0, 1, 2], 0.3)
    assert many[3] == pytest.approx(0.1) and sum(many) / 4 == pytest.approx(0.3)
    assert copy_layer_ratios(2, [], [0, 1], 0.3) == [0.3, 0.3]  # nothing left to take from
    assert copy_layer_ratios(3, [], [0], 0.9)[0] == 1.0  # at most every block
    with pytest.raises(ValueError, match="ratio"):
        copy_layer_ratios(4, [], [0], 0.0)
    with pytest.raises(ValueError, match="copy layers"):
        copy_layer_ratios(4, [], [4], 0.3)
    # another boost: the same budget moved by less (session 25's 4/3: 0.4 there, 0.25 elsewhere)
    milder = copy_layer_ratios(24, [0, 3, 7], [9, 11, 13, 16, 19, 21, 23], 0.3, boost=4 / 3)
    assert set(milder) == {1.0, 0.4, 0.25}
    assert copy_layer_ratios(4, [], [0], 0.3, boost=1) == [0.3] * 4
    with pytest.raises(ValueError, match="boost"):
        copy_layer_ratios(4, [], [0], 0.3, boost=0.5)


def test_budget_keys_name_every_sparse_layer_or_nothing() -> None:
    keys = copy_layer_budget_keys(6, [0], [2, 0], 0.3, 5 / 3)["layer_sparse_ratio"]
    assert keys == {str(i): r for i, r in enumerate(copy_layer_ratios(6, [0], [2], 0.3)) if i != 0}
    assert copy_layer_budget_keys(6, [0], [2], 0.3, 1.0) == {}  # boost 1: nothing moves
    assert copy_layer_budget_keys(6, [0, 2], [2], 0.3, 5 / 3) == {}  # its copying layer is dense


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"])
def test_the_shipped_jsons_budgets_follow_the_rule(name) -> None:
    cfg = load_model_config(name).config
    dense = [i for i, r in enumerate(cfg.top_k_ratio_per_layer) if r >= 1]
    want = copy_layer_ratios(cfg.num_hidden_layers, dense, cfg.copy_layers or [], 0.3)
    assert cfg.top_k_ratio_per_layer == pytest.approx(want)


def test_a_json_runs_at_another_ratio_with_its_shape_kept() -> None:
    shipped = copy_layer_ratios(6, [0], [2], 0.3)  # [1, 0.2, 0.5, 0.2, 0.2, 0.2] as shaped
    for ratio in (0.1, 0.3, 0.6):
        got = ratios_with_mean(shipped, {0}, ratio)
        assert got[0] == 1.0 and sum(got[1:]) / 5 == pytest.approx(ratio, abs=1e-5)  # rounded to 6 places
        assert got[2] / got[1] == pytest.approx(shipped[2] / shipped[1], rel=1e-4)  # the copying layer's share
    # a layer the scaling takes past 1 reads every block; the others share the rest
    got = ratios_with_mean([0.9, 0.1, 0.1], set(), 0.6)
    assert got == pytest.approx([1.0, 0.4, 0.4])
    assert ratios_with_mean([0.3, 0.3, 1.0], {2}, 0.1) == [0.1, 0.1, 1.0]  # a flat JSON stays flat
    # the dense layers of an ablation replace the JSON's own
    assert ratios_with_mean([1.0, 0.3, 0.3], {1}, 0.2) == [0.2, 1.0, 0.2]
