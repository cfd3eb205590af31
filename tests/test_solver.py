"""The solver on tiny random models: closed-form maths, determinism, errors, direction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from solver_helpers import last_token_input

from vllm_safety_patch.errors import DataError, VSPError
from vllm_safety_patch.solver.closed_form import (
    LayerStatistics,
    reduced_rank_ridge,
    solve_layer,
)
from vllm_safety_patch.solver.pipeline import solve
from vllm_safety_patch.solver.settings import DataSettings, SolveConfig, SolverSettings

TINY_DATA = DataSettings(
    multijail_ids=(0, 12), english_harmless=12, benign_per_language=4, mgsm_rows=(0, 4)
)


def tiny_config(**solver: object) -> SolveConfig:
    settings = dict(layers=[0, 2], neurons_per_layer=16, rank=4, batch_size=32)
    settings.update(solver)
    return SolveConfig(
        solver=SolverSettings(**settings),
        data=TINY_DATA,
        groups={"east-asian": ["zh", "ko"], "african": ["sw"], "all": ["zh", "ko", "sw"]},
    )


def _objective(update: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    return float(torch.trace(update @ gram @ update.T) - 2 * torch.trace(update @ cross.T))


def _random_problem(seed: int, d: int = 12, k: int = 8, n: int = 40):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=generator, dtype=torch.float64)
    t = torch.randn(d, n, generator=generator, dtype=torch.float64)
    return x @ x.T, t @ x.T


def test_full_rank_solution_is_the_ridge_solution() -> None:
    gram, cross = _random_problem(0)
    update = reduced_rank_ridge(gram, cross, torch.zeros_like(gram), rank=8, ridge=0.0)
    expected = cross @ torch.linalg.inv(gram)
    assert torch.allclose(update.dense(), expected, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_reduced_rank_beats_truncating_the_ridge_solution(rank: int) -> None:
    gram, cross = _random_problem(rank)
    gram = gram + torch.diag(torch.linspace(0.1, 50.0, gram.shape[0], dtype=torch.float64))
    update = reduced_rank_ridge(gram, cross, torch.zeros_like(gram), rank=rank, ridge=0.0)
    full = cross @ torch.linalg.inv(gram)
    left, singular, right = torch.linalg.svd(full)
    naive = left[:, :rank] @ torch.diag(singular[:rank]) @ right[:rank]
    assert torch.linalg.matrix_rank(update.dense()) == rank
    assert _objective(update.dense(), gram, cross) <= _objective(naive, gram, cross) + 1e-9


def test_projection_leaves_benign_directions_untouched() -> None:
    generator = torch.Generator().manual_seed(3)
    k, d = 10, 6
    benign_basis = torch.linalg.qr(torch.randn(k, 4, generator=generator, dtype=torch.float64))[0]
    benign = benign_basis @ torch.randn(4, 200, generator=generator, dtype=torch.float64)
    x = torch.randn(k, 50, generator=generator, dtype=torch.float64)
    t = torch.randn(d, 50, generator=generator, dtype=torch.float64)
    stats = LayerStatistics(x @ x.T, t @ x.T, benign @ benign.T, pairs=50, benign_tokens=200)
    update = solve_layer(stats, rank=3, constraint="projection", null_space_energy=0.999)
    assert update.dense().abs().max() > 1e-3  # it does something...
    assert (update.dense() @ benign).abs().max() < 1e-8  # ...but nothing on benign inputs
    penalty = solve_layer(stats, rank=3, constraint="penalty", benign_weight=100.0)
    assert (penalty.dense() @ benign).norm() < (update.dense().norm() * benign.norm())


def test_solve_is_deterministic_byte_for_byte(tiny_qwen2: Path) -> None:
    config = tiny_config()
    first = solve(tiny_qwen2, config, ["east-asian", "all"], "tiny")
    second = solve(tiny_qwen2, config, ["east-asian", "all"], "tiny")
    assert first.blobs == second.blobs
    manifest = first.deltas["east-asian"].manifest
    assert manifest.languages == ["zh", "ko"]
    assert [t.name for t in manifest.tensors] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    assert manifest.solver["rank"] == 4 and manifest.data_digests


def _last_token_down_proj_input(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    return last_token_input(model, tokenizer, text, model.model.layers[layer].mlp.down_proj)


@pytest.mark.parametrize("architecture", ["tiny_qwen2", "tiny_llama"])
def test_edit_moves_low_resource_outputs_toward_english_twins(
    architecture: str, request: pytest.FixtureRequest
) -> None:
    """The fitted pairs' residual W(a_en - a_lr) - dW a_lr shrinks (first edited layer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safety_patch.solver.prompts import gather_solve_data

    model_dir: Path = request.getfixturevalue(architecture)
    result = solve(model_dir, tiny_config(layers=[1], rank=8), ["all"], "tiny")
    name = "model.layers.1.mlp.down_proj.weight"
    edit = result.deltas["all"].edits[name]
    assert edit.neurons.numel() == 16 and edit.B.shape == (64, 8) and edit.A.shape == (8, 16)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weight = model.get_parameter(name).detach().double()
    data = gather_solve_data(["zh", "ko", "sw"], TINY_DATA)
    twins = {p.pair: p.text for p in data.english if p.role == "harmful_en"}
    before = after = 0.0
    for prompt in (p for p in data.others if p.role == "harmful_lr"):
        low = _last_token_down_proj_input(model, tokenizer, prompt.text, 1)
        english = _last_token_down_proj_input(model, tokenizer, twins[prompt.pair], 1)
        target = weight @ (english - low)
        before += float(target.norm() ** 2)
        after += float((target - edit.update().double() @ low[edit.neurons]).norm() ** 2)
    assert after < before


def test_groups_compose_and_collisions_are_reported(tiny_qwen2: Path) -> None:
    from vllm_safety_patch.delta.compose import find_collisions

    result = solve(tiny_qwen2, tiny_config(), ["east-asian", "african"], "tiny")
    collisions = find_collisions(list(result.deltas.values()))
    # neurons come from English scoring, so groups share them: reported, per tensor
    assert {c.tensor for c in collisions} == {
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }


def test_unknown_group_is_refused(tiny_qwen2: Path) -> None:
    with pytest.raises(VSPError, match="unknown group"):
        solve(tiny_qwen2, tiny_config(), ["nordic"], "tiny")


def test_layer_out_of_range_is_refused(tiny_qwen2: Path) -> None:
    with pytest.raises(VSPError, match=r"layers \[7\] do not exist"):
        solve(tiny_qwen2, tiny_config(layers=[7]), ["all"], "tiny")


def test_language_without_pairs_is_refused(tiny_qwen2: Path) -> None:
    config = tiny_config()
    config.groups["japanese"] = ["ja"]  # PolyRefuse has ja, but polyrefuse_pairs is 0
    with pytest.raises(DataError, match="no paired harmful data for language 'ja'"):
        solve(tiny_qwen2, config, ["japanese"], "tiny")


def test_unknown_language_in_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        SolveConfig(groups={"bad": ["xx"]})


def test_model_without_gated_mlp_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from vllm_safety_patch.models.tiny import _byte_tokenizer

    tokenizer = _byte_tokenizer()
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(VSPError, match="no (gated MLP|model.layers)"):
        solve(tmp_path, tiny_config(layers=[0]), ["all"], "tiny")


def test_layer_scan_rows_and_suggestion(tiny_qwen2: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from vllm_safety_patch.cli import app
    from vllm_safety_patch.solver.layer_scan import LayerScan, scan_layers, suggest_layers
    from vllm_safety_patch.solver.prompts import gather_solve_data

    config = tiny_config()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    rows = scan_layers(
        model, tokenizer, gather_solve_data(["zh", "sw"], config.data), config.solver
    )
    assert [row.layer for row in rows] == list(range(model.config.num_hidden_layers))
    for row in rows:
        assert 0 < row.mean_d <= row.best_d
        assert set(row.twin_gap) == {"zh", "sw"} and all(g > 0 for g in row.twin_gap.values())

    fake = [LayerScan(layer, mean_d, mean_d) for layer, mean_d in enumerate([1, 5, 4, 2, 3, 6])]
    assert suggest_layers(fake, count=2, spacing=2) == [1, 5]  # by d: 5, 1 (2 and 4 are too close)
    assert suggest_layers(fake, count=3, spacing=2) == [1, 3, 5]

    toml = tmp_path / "solve.toml"
    toml.write_text(
        "[solver]\nlayers = [0, 2]\nneurons_per_layer = 16\nrank = 4\n"
        "[data]\nmultijail_ids = [0, 12]\nenglish_harmless = 12\n"
        '[groups]\nafrican = ["sw"]\n'
    )
    result = CliRunner().invoke(app, ["scan", "--config", str(toml), "--model", str(tiny_qwen2)])
    assert result.exit_code == 0, result.output
    assert "strongest separation" in result.output and "sw" in result.output
    bad = CliRunner().invoke(
        app, ["scan", "--config", str(toml), "--model", str(tiny_qwen2), "--langs", "xx"]
    )
    assert bad.exit_code != 0 and "xx" in bad.output


def _benign_problem(seed: int, d: int = 12, k: int = 10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(k, 60, generator=generator, dtype=torch.float64)
    t = torch.randn(d, 60, generator=generator, dtype=torch.float64)
    decision = torch.randn(k, 30, generator=generator, dtype=torch.float64)
    tokens = torch.randn(k, 300, generator=generator, dtype=torch.float64)
    return x, t, decision, tokens


def test_decision_penalty_holds_benign_decision_positions() -> None:
    """The decision-position penalty shrinks the update on those rows, more as it grows."""
    x, t, decision, tokens = _benign_problem(5)
    stats = LayerStatistics(
        x @ x.T, t @ x.T, tokens @ tokens.T, pairs=60, benign_tokens=300,
        decision_grams=(decision @ decision.T / 30,),
    )  # fmt: skip
    moved = [
        float((solve_layer(stats, rank=4, decision_weight=w).dense() @ decision).norm())
        for w in (0.0, 1.0, 10.0)
    ]
    assert moved[0] > moved[1] > moved[2]
    same = solve_layer(stats, rank=4, decision_weight=0.0).dense()
    without = solve_layer(dataclasses_replace(stats, decision_grams=()), rank=4).dense()
    assert torch.equal(same, without)  # weight 0: exactly the all-token penalty alone


def dataclasses_replace(stats: LayerStatistics, **changes: object) -> LayerStatistics:
    import dataclasses

    return dataclasses.replace(stats, **changes)


def test_benign_alignment_maps_benign_rows_towards_their_twins() -> None:
    x, t, benign, tokens = _benign_problem(6)
    shift = torch.randn(t.shape[0], benign.shape[1], dtype=torch.float64)
    stats = LayerStatistics(
        x @ x.T, t @ x.T, tokens @ tokens.T, pairs=60, benign_tokens=300,
        aligned_gram=benign @ benign.T, aligned_cross=shift @ benign.T, aligned=30,
    )  # fmt: skip

    def residual(beta: float) -> float:
        update = solve_layer(stats, rank=8, benign_weight=0.0, benign_alignment=beta).dense()
        return float((update @ benign - shift).norm())

    assert residual(4.0) < residual(1.0) < residual(0.0)


def test_everyday_rows_join_the_solve_from_the_train_split_only(tiny_qwen2: Path) -> None:
    from vllm_safety_patch.solver.prompts import gather_solve_data

    data_settings = TINY_DATA.model_copy(update={"everyday_rows": 6})
    data = gather_solve_data(["sw"], data_settings)
    roles = [(p.lang, p.role) for p in [*data.english, *data.others]]
    assert roles.count(("en", "benign_en")) == 6 and roles.count(("sw", "benign_lr")) == 6
    assert all(
        p.pair and p.pair.startswith("everyday:") for p in data.others if p.role == "benign_lr"
    )
    assert {key for key in data.digests if key.startswith("everyday/")} == {
        "everyday/train/en", "everyday/train/sw",
    }  # fmt: skip

    config = tiny_config(decision_weight=1.0, benign_alignment=1.0)
    config = config.model_copy(update={"data": data_settings})
    first = solve(tiny_qwen2, config, ["african", "all"], "tiny")
    assert first.blobs == solve(tiny_qwen2, config, ["african", "all"], "tiny").blobs
    manifest = first.deltas["african"].manifest
    assert manifest.solver["decision_weight"] == 1.0 and manifest.solver["benign_alignment"] == 1.0
    assert manifest.solver["data"]["everyday_rows"] == 6
    old = config.solver.model_copy(update={"decision_weight": 0.0, "benign_alignment": 0.0})
    plain = solve(tiny_qwen2, config.model_copy(update={"solver": old}), ["african"], "tiny")
    assert plain.blobs["african"] != first.blobs["african"]


def test_within_language_scoring_picks_other_neurons(tiny_qwen2: Path) -> None:
    data = TINY_DATA.model_copy(update={"everyday_rows": 6})
    english = tiny_config().model_copy(update={"data": data})
    within = tiny_config(neuron_scoring="within-language").model_copy(update={"data": data})
    a = solve(tiny_qwen2, english, ["all"], "tiny")
    b = solve(tiny_qwen2, within, ["all"], "tiny")
    a, b_neurons = a.neurons["all"], b.neurons["all"]
    assert any(not torch.equal(a[layer], b_neurons[layer]) for layer in a)
    assert b.blobs == solve(tiny_qwen2, within, ["all"], "tiny").blobs  # deterministic


def test_everyday_rows_for_a_language_without_them_are_refused() -> None:
    from vllm_safety_patch.solver.prompts import gather_solve_data

    with pytest.raises(DataError, match="everyday"):
        settings = {"everyday_rows": 4, "polyrefuse_pairs": 2}  # Yoruba has PolyRefuse pairs
        gather_solve_data(["yo"], TINY_DATA.model_copy(update=settings))


def test_bad_group_name_is_refused_before_solving() -> None:
    with pytest.raises(ValueError, match="group name 'Compare-B'"):
        SolveConfig(groups={"Compare-B": ["sw"]})


def test_language_balance_weighs_each_language_by_its_part_of_the_pair_term() -> None:
    """'language' at weight w on a language holding a quarter of the pairs = 'group' at w/4."""
    generator = torch.Generator().manual_seed(11)
    k, d = 8, 6
    x = torch.randn(k, 40, generator=generator, dtype=torch.float64)
    t = torch.randn(d, 40, generator=generator, dtype=torch.float64)
    benign = torch.randn(k, 30, generator=generator, dtype=torch.float64)
    decision = torch.randn(k, 10, generator=generator, dtype=torch.float64)
    stats = LayerStatistics(
        x @ x.T, t @ x.T, benign @ benign.T, pairs=40, benign_tokens=30,
        decision_grams=(decision @ decision.T / 10,), decision_shares=(0.25,),
    )  # fmt: skip
    by_language = solve_layer(stats, rank=3, decision_weight=8.0, decision_balance="language")
    by_group = solve_layer(stats, rank=3, decision_weight=2.0, decision_balance="group")
    assert torch.allclose(by_language.dense(), by_group.dense(), atol=1e-10)
    with pytest.raises(ValueError, match="decision_balance"):
        solve_layer(stats, rank=3, decision_weight=1.0, decision_balance="languages")


def test_a_language_s_own_decision_weight_holds_it_harder() -> None:
    """decision_weights replaces decision_weight for the languages it names: naming a
    language with a larger weight shrinks the update on its benign rows, and naming one with
    the common weight changes nothing."""
    generator = torch.Generator().manual_seed(12)
    k, d = 8, 6
    x = torch.randn(k, 40, generator=generator, dtype=torch.float64)
    t = torch.randn(d, 40, generator=generator, dtype=torch.float64)
    benign = torch.randn(k, 30, generator=generator, dtype=torch.float64)
    en, bn = (torch.randn(k, 10, generator=generator, dtype=torch.float64) for _ in range(2))
    stats = LayerStatistics(
        x @ x.T, t @ x.T, benign @ benign.T, pairs=40, benign_tokens=30,
        decision_grams=(en @ en.T / 10, bn @ bn.T / 10), decision_shares=(0.5, 0.5),
        decision_languages=("en", "bn"),
    )  # fmt: skip
    common = solve_layer(stats, rank=3, decision_weight=2.0, decision_balance="language")
    same = solve_layer(stats, rank=3, decision_weight=2.0, decision_weights={"bn": 2.0})
    held = solve_layer(
        stats, rank=3, decision_weight=2.0, decision_balance="language",
        decision_weights={"bn": 32.0},
    )  # fmt: skip
    assert torch.allclose(same.dense(), solve_layer(stats, rank=3, decision_weight=2.0).dense())
    assert float((held.dense() @ bn).norm()) < 0.5 * float((common.dense() @ bn).norm())


def test_decision_weights_name_languages() -> None:
    assert SolverSettings(decision_weights={"bn": 64.0}).decision_weights == {"bn": 64.0}
    with pytest.raises(ValueError, match="decision_weights"):
        SolverSettings(decision_weights={"bengali": 64.0})
    with pytest.raises(ValueError, match="decision_weights: bn"):
        SolverSettings(decision_weights={"bn": -1.0})


def test_each_group_is_solved_on_its_own_edits(tiny_qwen2: Path) -> None:
    """A group solved beside 'all' is byte for byte the group solved alone: its later layers
    see its own earlier edits, as serving it does, not those of 'all'."""
    config = tiny_config(decision_weight=4.0, decision_balance="language")
    together = solve(tiny_qwen2, config, ["african", "all"], "tiny")
    alone = solve(tiny_qwen2, config, ["african"], "tiny")
    assert together.blobs["african"] == alone.blobs["african"]
    manifest = together.deltas["african"].manifest
    assert manifest.solver["decision_balance"] == "language"
    assert all(key.rsplit("/", 1)[-1] in ("en", "sw") for key in manifest.data_digests)
