"""Rank-slot machinery (``lightning_peft.allocation.rank_ops``), EPnG's prune/grow planner
(``allocation.epng.plan_prune_grow``) and AdaLoRA's budget schedule (``allocation.adalora.cubic_budget``):
unit tests of each function's contract on small tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lightning_peft.allocation.adalora import cubic_budget
from lightning_peft.allocation.epng import plan_prune_grow
from lightning_peft.allocation.rank_ops import (
    RankAdaptive,
    check_budget,
    drop_slots,
    effective_parameters,
    free_slots,
    full_tensor,
    masked,
    orthogonal_rows,
    slot_generator,
    write_rows,
    zero_slots,
)

G, R, D_IN, D_OUT = 2, 4, 6, 5


class Experts(nn.Module):
    """A grouped rank-adaptive layer laid out like ExpertLoRA: ``A [G, R, d_in]``, ``B [G, d_out, R]``."""

    def __init__(self, seed: int = 0, groups: int = G) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(groups, R, D_IN, generator=gen))
        self.lora_B = nn.Parameter(torch.randn(groups, D_OUT, R, generator=gen))
        self.register_buffer("rank_mask", torch.ones(groups, R, dtype=torch.bool))

    def rank_parameters(self):
        return [(self.lora_A, 0, 1), (self.lora_B, 0, 2)]

    def slot_cost(self) -> int:
        return D_IN + D_OUT

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [G, N, d_in] -> [G, N, d_out]
        a = masked(self.lora_A, self.rank_mask, 0, 1)
        b = masked(self.lora_B, self.rank_mask, 0, 2)
        return x @ a.transpose(1, 2) @ b.transpose(1, 2)


class Dense(nn.Module):
    """One group without a group dimension, laid out like AdaLoRA: ``A [R, d_in]``, ``E [R, 1]``, ``B [d_out, R]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(R, D_IN, generator=gen))
        self.lora_E = nn.Parameter(torch.randn(R, 1, generator=gen))
        self.lora_B = nn.Parameter(torch.randn(D_OUT, R, generator=gen))
        self.register_buffer("rank_mask", torch.ones(1, R, dtype=torch.bool))

    def rank_parameters(self):
        return [(self.lora_A, None, 0), (self.lora_E, None, 0), (self.lora_B, None, 1)]

    def slot_cost(self) -> int:
        return D_IN + D_OUT + 1


def _slots(*pairs: tuple[int, int], groups: int = G) -> torch.Tensor:
    mask = torch.zeros(groups, R, dtype=torch.bool)
    for g, k in pairs:
        mask[g, k] = True
    return mask


def _slot_view(param: torch.Tensor, group_dim: int | None, rank_dim: int) -> torch.Tensor:
    """``param`` as ``[G, R, rest]`` for per-slot comparisons."""
    t = param.unsqueeze(0) if group_dim is None else param
    gd, rd = (0, rank_dim + 1) if group_dim is None else (group_dim, rank_dim)
    return t.movedim((gd, rd), (0, 1)).reshape(t.shape[gd], t.shape[rd], -1)


def _assert_slots(after: torch.Tensor, before: torch.Tensor, slots: torch.Tensor, group_dim, rank_dim) -> None:
    """Chosen slots are exactly zero; every other slot is bit-identical to ``before``."""
    a, b = _slot_view(after, group_dim, rank_dim), _slot_view(before, group_dim, rank_dim)
    assert torch.equal(a[slots], torch.zeros_like(a[slots]))
    assert torch.equal(a[~slots], b[~slots])


# --------------------------------------------------------------------------------------------
# Protocol, counting, budget
# --------------------------------------------------------------------------------------------
def test_layers_satisfy_the_protocol_and_others_do_not():
    assert isinstance(Experts(), RankAdaptive) and isinstance(Dense(), RankAdaptive)
    assert not isinstance(nn.Linear(2, 2), RankAdaptive)


def test_effective_parameters_counts_active_slots_times_cost():
    layer = Experts()
    assert effective_parameters(layer) == G * R * (D_IN + D_OUT)
    layer.rank_mask[0, 1] = layer.rank_mask[1, 3] = layer.rank_mask[1, 0] = False
    assert effective_parameters(layer) == 5 * (D_IN + D_OUT)
    layer.rank_mask.fill_(False)
    assert effective_parameters(layer) == 0
    dense = Dense()
    dense.rank_mask[0, 2] = False
    assert effective_parameters(dense) == 3 * (D_IN + D_OUT + 1)
    assert isinstance(effective_parameters(dense), int)


def test_check_budget_returns_usage_and_refuses_overruns():
    layers = [Experts(), Dense()]
    used = G * R * (D_IN + D_OUT) + R * (D_IN + D_OUT + 1)
    assert check_budget(layers, used) == used  # exactly at the budget is fine
    assert check_budget(layers, used + 100) == used
    assert check_budget([], 0) == 0
    with pytest.raises(RuntimeError, match=f"uses {used:,} trainable parameters, above the budget of {used - 1:,}"):
        check_budget(layers, used - 1)
    layers[0].rank_mask[0, 0] = False  # one slot freed: fits again
    assert check_budget(layers, used - 1) == used - (D_IN + D_OUT)


# --------------------------------------------------------------------------------------------
# masked
# --------------------------------------------------------------------------------------------
def test_masked_zeroes_inactive_slots_and_their_gradient():
    layer = Experts()
    layer.rank_mask[0, 1] = layer.rank_mask[1, 3] = False
    inactive = ~layer.rank_mask
    out = masked(layer.lora_A, layer.rank_mask, 0, 1)
    assert out.shape == layer.lora_A.shape
    _assert_slots(out.detach(), layer.lora_A.detach(), inactive, 0, 1)
    x = torch.randn(G, 3, D_IN, generator=torch.Generator().manual_seed(1))
    layer(x).square().sum().backward()
    for param, gd, rd in layer.rank_parameters():
        grad = _slot_view(param.grad, gd, rd)
        assert torch.equal(grad[inactive], torch.zeros_like(grad[inactive]))  # exactly zero
        assert (grad[~inactive].abs().sum(-1) > 0).all()  # active slots do learn


def test_masked_without_group_dimension_and_transposed_layout():
    dense = Dense()
    mask = torch.tensor([[True, False, True, False]])
    for param, gd, rd in dense.rank_parameters():
        out = masked(param, mask, gd, rd)
        _assert_slots(out.detach(), param.detach(), ~mask, gd, rd)
    with pytest.raises(ValueError, match=r"needs a \[1, R\] mask"):
        masked(dense.lora_A, torch.ones(2, R, dtype=torch.bool), None, 0)
    # group dimension after the rank dimension: param [R, G, d]
    param = torch.randn(R, G, 3, generator=torch.Generator().manual_seed(2))
    mask = _slots((0, 1), (1, 2))
    out = masked(param, mask, 1, 0)
    for g in range(G):
        for k in range(R):
            expected = param[k, g] if mask[g, k] else torch.zeros(3)
            assert torch.equal(out[k, g], expected), (g, k)


def test_masked_keeps_the_dtype():
    param = torch.randn(G, R, D_IN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mask = _slots((0, 0), (1, 2))
    out = masked(param, mask, 0, 1)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[mask], param[mask]) and torch.count_nonzero(out[~mask]) == 0


# --------------------------------------------------------------------------------------------
# zero_slots, drop_slots
# --------------------------------------------------------------------------------------------
def _stepped(layer: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(G, 3, D_IN, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.Adam(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)])
def test_zero_slots_zeroes_parameters_and_optimizer_state_of_chosen_slots_only(make_optimizer):
    layer = Experts()
    optimizer = make_optimizer(layer.parameters())
    _stepped(layer, optimizer)
    slots = _slots((0, 2), (1, 0), (1, 3))
    params = {id(p): p.detach().clone() for p, _, _ in layer.rank_parameters()}
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p, _, _ in layer.rank_parameters()}
    mask = layer.rank_mask.clone()
    zero_slots(layer, slots, [optimizer])
    assert torch.equal(layer.rank_mask, mask)  # zeroing does not deactivate
    for param, gd, rd in layer.rank_parameters():
        _assert_slots(param.detach(), params[id(param)], slots, gd, rd)
        moments = [k for k, v in state[id(param)].items() if v.shape == param.shape]
        assert moments  # exp_avg / exp_avg_sq, or momentum_buffer
        for key, before in state[id(param)].items():
            if key in moments:
                assert torch.count_nonzero(_slot_view(before, gd, rd)[slots]) > 0  # there was something to zero
                _assert_slots(optimizer.state[param][key], before, slots, gd, rd)
            else:
                assert torch.equal(optimizer.state[param][key], before)  # e.g. Adam's step count


def test_zero_slots_can_leave_parameters_and_accepts_no_optimizer():
    layer = Experts()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    _stepped(layer, optimizer)
    slots = _slots((0, 0), (1, 1))
    params = [p.detach().clone() for p, _, _ in layer.rank_parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p, _, _ in layer.rank_parameters()]
    zero_slots(layer, slots, [optimizer], parameters=False)
    for (param, gd, rd), before, moment in zip(layer.rank_parameters(), params, moments):
        assert torch.equal(param.detach(), before)
        _assert_slots(optimizer.state[param]["exp_avg"], moment, slots, gd, rd)
    zero_slots(layer, slots)  # parameters only
    for (param, gd, rd), before in zip(layer.rank_parameters(), params):
        _assert_slots(param.detach(), before, slots, gd, rd)
    assert not any(p.grad_fn for p in layer.parameters())


def test_drop_slots_zeroes_and_deactivates():
    for layer, slots in ((Experts(), _slots((0, 1), (1, 1), (1, 2))), (Dense(), _slots((0, 0), (0, 3), groups=1))):
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        params = [p.detach().clone() for p, _, _ in layer.rank_parameters()]
        momenta = [optimizer.state[p]["momentum_buffer"].clone() for p, _, _ in layer.rank_parameters()]
        mask = layer.rank_mask.clone()
        drop_slots(layer, slots, [optimizer])
        assert torch.equal(layer.rank_mask, mask & ~slots)
        for (param, gd, rd), before, momentum in zip(layer.rank_parameters(), params, momenta):
            _assert_slots(param.detach(), before, slots, gd, rd)
            _assert_slots(optimizer.state[param]["momentum_buffer"], momentum, slots, gd, rd)
        active = effective_parameters(layer)
        drop_slots(layer, slots)  # dropping again changes nothing
        assert effective_parameters(layer) == active and torch.equal(layer.rank_mask, mask & ~slots)


# --------------------------------------------------------------------------------------------
# free_slots, write_rows, full_tensor
# --------------------------------------------------------------------------------------------
def test_free_slots_lists_the_first_inactive_slots():
    row = torch.tensor([True, False, True, False, False, True])
    assert free_slots(row, 2) == [1, 3]
    assert free_slots(row, 10) == [1, 3, 4]  # fewer free than asked: all of them
    assert free_slots(row, 0) == []
    assert free_slots(torch.ones(4, dtype=torch.bool), 2) == []


def test_write_rows_writes_only_the_chosen_slots_of_one_group():
    layer = Experts()
    gen = torch.Generator().manual_seed(5)
    before_a, before_b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    rows = torch.randn(2, D_IN, generator=gen, dtype=torch.float64)  # converted to the param's dtype
    write_rows(layer.lora_A, 1, 1, [0, 2], rows)
    cols = torch.randn(D_OUT, 2, generator=gen)
    write_rows(layer.lora_B, 0, 2, [3, 1], cols)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad_fn is None
    assert torch.equal(layer.lora_A[1, [0, 2]].detach(), rows.float())
    assert torch.equal(layer.lora_B[0][:, [3, 1]].detach(), cols)
    written_a, written_b = _slots((1, 0), (1, 2)), _slots((0, 3), (0, 1))
    a, b = _slot_view(layer.lora_A.detach(), 0, 1), _slot_view(layer.lora_B.detach(), 0, 2)
    assert torch.equal(a[~written_a], _slot_view(before_a, 0, 1)[~written_a])
    assert torch.equal(b[~written_b], _slot_view(before_b, 0, 2)[~written_b])


def test_full_tensor_returns_a_plain_tensor_itself():
    t = torch.randn(3, 2)
    assert full_tensor(t) is t


# --------------------------------------------------------------------------------------------
# orthogonal_rows, slot_generator
# --------------------------------------------------------------------------------------------
def _check_orthogonal(new: torch.Tensor, existing: torch.Tensor, norm: float) -> None:
    new, existing = new.double(), existing.double()
    tol = 1e-10 * norm * max(1.0, float(existing.norm(dim=1).max()) if len(existing) else 1.0)
    if len(existing):
        assert (new @ existing.t()).abs().max() < tol
    gram = new @ new.t()
    torch.testing.assert_close(gram, norm**2 * torch.eye(len(new), dtype=torch.float64), rtol=0, atol=1e-10 * norm**2)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_orthogonal_rows_are_orthogonal_to_existing_and_each_other(scale):
    existing = scale * torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    new = orthogonal_rows(existing, 4, slot_generator(0, 1))
    assert new.shape == (4, 8) and new.is_contiguous()
    mean_norm = float(existing.double().norm(dim=1).mean())
    torch.testing.assert_close(new.norm(dim=1), torch.full((4,), mean_norm, dtype=new.dtype), rtol=1e-9, atol=0)
    _check_orthogonal(new, existing, mean_norm)


def test_orthogonal_rows_fill_the_space_and_honour_row_norm():
    existing = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
    new = orthogonal_rows(existing, 3, slot_generator(1), row_norm=0.25)  # k + n == d
    _check_orthogonal(new, existing, 0.25)
    together = torch.cat([existing.double(), new])
    assert torch.linalg.matrix_rank(together) == 8


def test_orthogonal_rows_without_existing_rows_and_with_zero_rows():
    new = orthogonal_rows(torch.zeros(0, 6), 3, slot_generator(2))
    _check_orthogonal(new, torch.zeros(0, 6), 1 / math.sqrt(3.0))
    # zero rows (inactive slots) are ignored: neither in the norm nor in the span
    existing = torch.zeros(4, 6)
    existing[1] = torch.tensor([3.0, 0, 0, 0, 0, 0])
    existing[3] = torch.tensor([0, 0.0, 4.0, 0, 0, 0])
    new = orthogonal_rows(existing, 2, slot_generator(3))
    _check_orthogonal(new, existing[[1, 3]], 3.5)
    all_zero = orthogonal_rows(torch.zeros(2, 6), 2, slot_generator(4))
    _check_orthogonal(all_zero, torch.zeros(0, 6), 1 / math.sqrt(3.0))


def test_orthogonal_rows_refuses_too_many_rows():
    with pytest.raises(ValueError, match="cannot add 4 rows orthogonal to 3 existing ones in dimension 6"):
        orthogonal_rows(torch.randn(3, 6), 4, slot_generator(0))
    with pytest.raises(ValueError, match="needs k \\+ n <= d"):
        orthogonal_rows(torch.zeros(0, 2), 3, slot_generator(0))


def test_orthogonal_rows_are_deterministic_from_the_generator():
    existing = torch.randn(2, 7, generator=torch.Generator().manual_seed(8))
    first = orthogonal_rows(existing, 3, slot_generator(42, 5, 1, 2))
    again = orthogonal_rows(existing.clone(), 3, slot_generator(42, 5, 1, 2))
    assert torch.equal(first, again)  # bit-identical
    other = orthogonal_rows(existing, 3, slot_generator(42, 5, 1, 3))
    assert not torch.allclose(first, other)
    # the input dtype does not matter: computed in float64 from the same draws
    half = orthogonal_rows(existing.to(torch.float64), 3, slot_generator(42, 5, 1, 2))
    assert torch.equal(first, half)
    assert existing.dtype == torch.float32  # the input is not modified in place


def test_slot_generator_is_seeded_by_seed_and_keys():
    def draw(*args: int) -> torch.Tensor:
        return torch.randn(8, generator=slot_generator(*args))

    assert slot_generator(0).device.type == "cpu"
    assert torch.equal(draw(7, 1, 2), draw(7, 1, 2))
    draws = [draw(7), draw(8), draw(7, 1), draw(7, 2), draw(7, 1, 2), draw(7, 2, 1), draw(7, 1, 2, 0), draw(8, 1, 2)]
    for i, a in enumerate(draws):
        for b in draws[i + 1 :]:
            assert not torch.equal(a, b)  # every seed, key and key order gives its own stream
    distinct = {slot_generator(0, step, layer, expert).initial_seed() for step in range(5) for layer in range(4) for expert in range(8)}
    assert len(distinct) == 5 * 4 * 8


# --------------------------------------------------------------------------------------------
# EPnG plan
# --------------------------------------------------------------------------------------------
def _cost(ranks, costs) -> int:
    return sum(r * costs[l] for l, layer in enumerate(ranks) for r in layer)


def test_plan_moves_the_least_important_rank_to_the_most_important():
    importance = [torch.tensor([0.1, 0.4, 0.2, 0.3])]
    ranks = [[4, 4, 4, 4]]
    new = plan_prune_grow(importance, ranks, [1], [8], 16, 0.25, 0.25, [1])
    assert new == [[0, 8, 4, 4]]
    assert ranks == [[4, 4, 4, 4]]  # the input is not modified


def test_plan_stops_pruning_once_growth_is_capped_by_limits():
    importance = [torch.tensor([0.1, 0.4, 0.2, 0.3])]
    new = plan_prune_grow(importance, [[4, 4, 4, 4]], [1], [6], 16, 0.5, 0.25, [1])
    # growing expert 1 can absorb only 2 ranks: one pruned expert already frees 4, the second is kept
    assert new == [[0, 6, 4, 4]]
    assert _cost(new, [1]) <= 16


def test_plan_breaks_ties_by_layer_and_expert():
    importance = [torch.zeros(4), torch.zeros(4)]
    new = plan_prune_grow(importance, [[2, 2, 2, 2], [2, 2, 2, 2]], [3, 3], [4, 4], 48, 0.125, 0.125, [1, 1])
    assert new == [[0, 2, 2, 2], [2, 2, 2, 4]]  # prune (0, 0), grow (1, 3)


def test_plan_respects_min_active_and_leaves_inactive_experts():
    importance = [torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.3, 0.05, 0.4])]
    new = plan_prune_grow(importance, [[2, 2, 2], [2, 0, 2]], [1, 1], [6, 6], 12, 0.99, 0.2, [3, 2])
    # nothing may be pruned (layer 0 needs 3 active, layer 1 has exactly 2), and the pruned expert stays pruned
    assert new[1][1] == 0
    assert all(r > 0 for r in new[0]) and new[1][0] > 0 and new[1][2] > 0
    assert new == [[2, 2, 4], [2, 0, 2]]  # the slack of 2 (budget 12, 10 used) went to the most important expert


def test_plan_without_active_experts_or_fractions_changes_nothing():
    importance = [torch.tensor([0.5, 0.1])]
    assert plan_prune_grow(importance, [[0, 0]], [5], [4], 100, 0.5, 0.5, [0]) == [[0, 0]]
    assert plan_prune_grow(importance, [[2, 3]], [5], [4], 25, 0.0, 0.0, [0]) == [[2, 3]]


def test_plan_invariants_on_random_cases():
    rnd = random.Random(0)
    for case in range(200):
        layers = rnd.randint(1, 3)
        experts = [rnd.randint(1, 6) for _ in range(layers)]
        limits = [rnd.randint(2, 8) for _ in range(layers)]
        costs = [1] * layers if case % 2 == 0 else [rnd.randint(1, 10) for _ in range(layers)]
        ranks = [[rnd.randint(0, limits[l]) for _ in range(experts[l])] for l in range(layers)]
        gen = torch.Generator().manual_seed(case)
        importance = [torch.rand(e, generator=gen) for e in experts]
        used = _cost(ranks, costs)
        budget = used + (0 if case % 3 == 0 else rnd.randint(0, 20))
        min_active = [rnd.randint(0, 2) for _ in range(layers)]
        args = (importance, ranks, costs, limits, budget, rnd.choice([0.1, 0.25, 0.5]), rnd.choice([0.1, 0.25, 0.5]), min_active)
        new = plan_prune_grow(*args)
        assert new == plan_prune_grow(*args)  # deterministic
        assert [len(r) for r in new] == experts
        assert _cost(new, costs) <= budget, case
        for l in range(layers):
            assert all(0 <= r <= limits[l] for r in new[l]), case
            assert all(new[l][e] == 0 for e in range(experts[l]) if ranks[l][e] == 0), case  # no revival in the same cycle
            before = sum(r > 0 for r in ranks[l])
            assert sum(r > 0 for r in new[l]) >= min(before, min_active[l]), case


def test_plan_conserves_total_rank_with_unit_costs():
    importance = [torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8]), torch.tensor([0.05, 0.6, 0.7])]
    ranks = [[4, 4, 4, 4, 4, 4], [4, 4, 4]]
    for prune, grow in ((0.25, 0.25), (0.5, 0.25), (0.1, 0.5)):
        new = plan_prune_grow(importance, ranks, [1, 1], [16, 16], 36, prune, grow, [1, 1])
        assert sum(map(sum, new)) == 36, (prune, grow)
        assert new != ranks


# --------------------------------------------------------------------------------------------
# AdaLoRA budget
# --------------------------------------------------------------------------------------------
SCHEDULE = dict(initial=100, target=20, init_warmup=10, final_warmup=10, total_steps=110, interval=5)


def test_cubic_budget_exact_values():
    assert cubic_budget(0, **SCHEDULE) == (100, False)
    assert cubic_budget(10, **SCHEDULE) == (100, False)  # warm-up: initial budget, no reallocation
    assert cubic_budget(11, **SCHEDULE) == (int(80 * (1 - 1 / 90) ** 3 + 20), False)
    assert cubic_budget(11, **SCHEDULE)[0] == 97
    assert cubic_budget(55, **SCHEDULE) == (30, True)  # progress 1/2: 80 / 8 + 20
    assert cubic_budget(55, **{**SCHEDULE, "interval": 10}) == (30, False)
    assert cubic_budget(100, **SCHEDULE) == (20, True)  # the end of the decrease
    assert cubic_budget(101, **SCHEDULE) == (20, True)  # final warm-up: target, every step
    assert cubic_budget(10_000, **SCHEDULE) == (20, True)


def test_cubic_budget_is_monotone_and_bounded():
    budgets = [cubic_budget(step, **SCHEDULE)[0] for step in range(0, 130)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert max(budgets) == 100 and min(budgets) == 20
    assert all(20 <= b <= 100 for b in budgets)
    realloc = [step for step in range(11, 101) if cubic_budget(step, **SCHEDULE)[1]]
    assert realloc == list(range(15, 101, 5))
