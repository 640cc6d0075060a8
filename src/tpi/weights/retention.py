"""The retention plan: which of a device's blocks the sliding-window scheduler keeps resident
under its budget, which it streams every token, and which experts it reads only on demand
(tpi.weights.scheduler describes the policy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi.weights.budget import MemoryBudgetError, format_size
from tpi.weights.packing import packed_copy_bytes
from tpi.weights.store import ShardStore, aligned_bytes

def block_costs(store: ShardStore, rank: int, compute_dtype: torch.dtype, gguf_exact: bool = False) -> list[int]:
    """Bytes each block of the device's slice holds when loaded, in execution order: its read
    buffer (the file rounded up to whole pages, see `aligned_empty`) plus any dtype
    conversions. The budget is planned and accounted by this one rule."""
    return [aligned_bytes(store.files[rel].bytes) + packed_copy_bytes(store.files[rel].tensors, compute_dtype, gguf_exact)
            for rel in store.block_files(rank)]


@dataclass(frozen=True)
class RetentionPlan:
    resident: tuple[int, ...]     # indices (in execution order) of blocks kept for good
    streamed: tuple[int, ...]     # indices of blocks read every token, in execution order
    slots: int                    # window buffers actually allocated: min(window, streamed)
    slot_cost: int                # bytes per window slot (largest streamed block, + conversions)
    planned_bytes: int            # resident costs + slots * slot_cost (+ demand_slot) (<= budget)
    on_demand: tuple[int, ...] = ()  # experts read only when chosen, into one slot of their own
    demand_slot: int = 0          # bytes of that slot (largest such expert, + conversions)


def plan_retention(costs: list[int], window: int, budget: int | None) -> RetentionPlan:
    """Choose the resident blocks. costs[i]: bytes block i holds when loaded (execution order).

    Everything is resident when it fits (or there is no budget). Otherwise the plan streams
    as few bytes per token as the budget allows: the window takes min(window, streamed) slots
    the size of the largest streamed block, so keeping the biggest blocks resident can shrink
    every slot. Each candidate slot size is tried (blocks above it must be resident); for each,
    the rest of the budget holds blocks picked evenly through the order (by bytes), then
    topped up; the candidate streaming the fewest bytes wins."""
    n = len(costs)
    if window < 1:
        raise MemoryBudgetError(f"the window must hold at least one block, got {window}")
    total = sum(costs)
    if budget is None or total <= budget:
        return RetentionPlan(tuple(range(n)), (), 0, 0, total)
    plans = [p for p in (_plan_for_slot(costs, window, budget, s) for s in sorted(set(costs))) if p]
    if not plans:
        largest = max(costs)
        need = min(window * s + sum(c for c in costs if c > s) for s in set(costs))
        fits = budget // largest
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} cannot hold a window of {window} blocks of up to "
            f"{format_size(largest)}; " + (f"use --window {fits} or " if fits else "")
            + f"give a budget of at least {format_size(need)}")
    plan = min(plans, key=lambda p: (sum(costs[i] for i in p.streamed), p.planned_bytes))
    assert plan.planned_bytes <= budget, (plan, budget)
    return plan


def plan_with_experts(costs: list[int], is_expert: list[bool], window: int, budget: int | None) -> RetentionPlan:
    """`plan_retention` for a slice with experts (see the module doc): when not everything
    fits, one slot for the largest expert is set aside, the dense blocks are planned in the
    rest, and experts fill what that plan leaves, in execution order; the others are on demand."""
    if budget is None or sum(costs) <= budget or not any(is_expert):
        return plan_retention(costs, window, budget)
    dense = [i for i, e in enumerate(is_expert) if not e]
    experts = [i for i, e in enumerate(is_expert) if e]
    slot = max(costs[i] for i in experts)
    inner = plan_retention([costs[i] for i in dense], window, budget - slot)
    room = budget - slot - inner.planned_bytes
    resident, on_demand = [dense[i] for i in inner.resident], []
    for i in experts:
        if costs[i] <= room:
            resident.append(i)
            room -= costs[i]
        else:
            on_demand.append(i)
    slot = max((costs[i] for i in on_demand), default=0)
    planned = inner.planned_bytes + sum(costs[i] for i in experts if i not in on_demand) + slot
    return RetentionPlan(tuple(sorted(resident)), tuple(dense[i] for i in inner.streamed), inner.slots,
                         inner.slot_cost, planned, tuple(on_demand), slot)


def _plan_for_slot(costs: list[int], window: int, budget: int, slot: int) -> RetentionPlan | None:
    """The plan whose streamed blocks all cost at most `slot`; None if that cannot fit."""
    n = len(costs)
    resident = {i for i in range(n) if costs[i] > slot}
    used = sum(costs[i] for i in resident)
    avail = budget - window * slot - used
    if avail < 0:
        return None
    # Evenly by bytes: block i becomes resident when the bytes "owed" so far cover it.
    candidates = [i for i in range(n) if i not in resident]
    frac, owed = avail / sum(costs[i] for i in candidates), 0.0
    for i in candidates:
        owed += frac * costs[i]
        if owed >= costs[i] and used + costs[i] <= budget - window * slot:
            resident.add(i)
            owed -= costs[i]
            used += costs[i]
    while True:  # top up: a smaller or shorter window can free room for more residents
        streamed = [i for i in range(n) if i not in resident]
        slots = min(window, len(streamed))
        slot_cost = max(costs[i] for i in streamed)
        room = budget - slots * slot_cost - used
        extra = next((i for i in streamed if costs[i] <= room and len(streamed) > 1), None)
        if extra is None:
            break
        resident.add(extra)
        used += costs[extra]
    return RetentionPlan(tuple(sorted(resident)), tuple(streamed), slots, slot_cost, used + slots * slot_cost)



def demote(costs: list[int], is_expert: list[bool], plan: RetentionPlan, window: int, budget: int) -> RetentionPlan:
    """`plan` under a smaller `budget` without loading anything: resident dense blocks become
    streamed until the plan fits (experts keep their place). Each step demotes the resident
    block farthest, in the circular execution order, from every streamed one, so the reads
    stay spread between resident blocks' compute; blocks no bigger than the window's slots go
    first (a bigger one grows every slot). Raises MemoryBudgetError if even streaming every
    dense block does not fit."""
    n = len(costs)
    resident, streamed = set(plan.resident), set(plan.streamed)

    def planned() -> tuple[int, int, int]:   # bytes, slots, slot size
        slot = max((costs[i] for i in streamed), default=0)
        slots = min(window, len(streamed))
        return sum(costs[i] for i in resident) + slots * slot + plan.demand_slot, slots, slot

    def distance(i: int) -> int:             # to the nearest streamed block, circularly
        return min((min(abs(i - j), n - abs(i - j)) for j in streamed), default=n)

    while planned()[0] > budget:
        candidates = [i for i in resident if not is_expert[i]]
        if not candidates:
            raise MemoryBudgetError(
                f"memory budget {format_size(budget)} cannot hold a window of {window} blocks of up to "
                f"{format_size(max(costs))} beside the KV cache: lower --slots or --max-seq")
        slot = planned()[2]
        pick = min(candidates, key=lambda i: (bool(streamed) and costs[i] > slot, -distance(i), i))
        resident.remove(pick)
        streamed.add(pick)
    used, slots, slot = planned()
    return RetentionPlan(tuple(sorted(resident)), tuple(sorted(streamed)), slots, slot, used,
                         plan.on_demand, plan.demand_slot)
