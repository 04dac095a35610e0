"""Which components a rank move takes and which layers receive them (online growth's moves).

A move removes donor components to pay for one more rank of a receiver, within the budget. Layers
differ in price (``d + k`` parameters per rank: in a transformer an MLP rank costs about twice an
attention rank), so one cheap component cannot pay for a rank of a dearer layer. Paying with one
component only would let ranks flow from dear layers to cheap ones and never back; a receiver's
rank is therefore paid by one component *or several*, whichever way removes less score:

- the lowest-scored single component that pays for it alone (with the budget left), or
- the lowest-scored components taken in order until they pay, less those (highest score first)
  that the rest can do without (a component whose removal lowers the loss, score < 0, stays
  taken).

Scores add up (loss units, e.g. ablation: the loss a removal costs); the single component wins a
tie.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from lorambo.allocation.components import at_most_per_layer

__all__ = ["plan_moves"]


def plan_moves(next_gains: Mapping[str, float], scores: Mapping[str, Sequence[float]],
               costs: Mapping[str, int], room: Mapping[str, int], budget_left: int,
               threshold: float, move_threshold: float, max_moves: int = 1,
               spare: Mapping[str, int] | None = None) -> list[tuple[str, int, str]]:
    """Rank moves ``(donor, component, receiver)``: donor components whose importance score
    (loss units, e.g. ablation) is below ``move_threshold`` are removed to fund one more rank of
    a receiver whose next gain exceeds ``threshold``. Receivers by best gain / cost; each is paid
    by one donor component or several (see the module doc), so one receiver may appear in several
    entries; a layer is never both donor and receiver; the spend stays within the budget.
    ``max_moves``: receivers (ranks received) at most. ``spare``: at most ``spare[name]``
    components leave layer ``name`` (its rank above ``min_rank``); None: no limit."""
    receivers = sorted((n for n, g in next_gains.items() if g > threshold and room.get(n, 0) > 0),
                       key=lambda n: -next_gains[n] / costs[n])
    donors = sorted((float(s), n, k) for n, sc in scores.items() for k, s in enumerate(sc)
                    if float(s) < move_threshold)
    if spare is not None:  # a layer's components leave in this order: only its first `spare` can
        donors = list(at_most_per_layer(donors, lambda n: spare.get(n, 0)))
    # what the unused donors of each layer could pay: a receiver that all of them together cannot
    # fund is passed over without a scan (most receivers, when few donors are left)
    pay: dict[str, int] = {}
    for _, n, _ in donors:
        pay[n] = pay.get(n, 0) + int(costs[n])
    payable = sum(pay.values())  # over layers that have not received
    dearest = max((int(costs[n]) for n in pay), default=0)  # no single donor pays a price above it
    unused = [True] * len(donors)
    moves, left = [], int(budget_left)
    donor_layers: set[str] = set()
    receiving: set[str] = set()
    for recv in receivers:
        if len(receiving) >= max_moves:
            break
        price = int(costs[recv]) - left
        if recv in donor_layers or payable - pay.get(recv, 0) < max(price, 1):
            continue
        eligible = ((score, int(costs[n]), e) for e, (score, n, _) in enumerate(donors)
                    if unused[e] and n != recv and n not in receiving)
        taken = _cheapest_funding(eligible, price, dearest)
        for e in taken:
            _, donor, comp = donors[e]
            unused[e] = False
            moves.append((donor, comp, recv))
            donor_layers.add(donor)  # never a receiver now, so its own `pay` is not read again
            payable -= int(costs[donor])
            left += int(costs[donor])
        left -= int(costs[recv])
        receiving.add(recv)
        payable -= pay.get(recv, 0)  # a receiver's own components no longer leave
    return moves


def _cheapest_funding(candidates: Iterator[tuple[float, int, int]], price: int, dearest: int) -> list[int]:
    """Ids of the donors that pay ``price`` (at least one donor, even when ``price <= 0``).
    ``candidates``: ``(score, cost, id)`` in ascending score order, together able to pay; read
    only as far as needed (``dearest``: no candidate costs more)."""
    single, run, paid, kept = None, [], 0, None
    for c in candidates:
        if single is None and c[1] >= price:
            single = c
        if paid < price or not run:
            run.append(c)
            paid += c[1]
            if paid >= price:
                kept = _pruned(run, paid, price)
        # a later single scores at least c[0]: stop once it could no longer beat the run
        if kept is not None and (single is not None or price > dearest or c[0] > sum(k[0] for k in kept)):
            break
    if single is not None and single[0] <= sum(c[0] for c in kept):
        return [single[2]]
    return [c[2] for c in kept]


def _pruned(run: list, paid: int, price: int) -> list:
    """``run`` less what the rest can pay without, highest score first; a component whose removal
    lowers the loss (score < 0) goes anyway."""
    run = list(run)
    for c in sorted(run, key=lambda c: -c[0]):
        if c[0] >= 0 and len(run) > 1 and paid - c[1] >= price:
            run.remove(c)
            paid -= c[1]
    return run
