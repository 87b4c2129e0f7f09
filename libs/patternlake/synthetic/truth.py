"""Score mined rules against a generator's ground truth (recall of planted rules, precision)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq


@dataclass
class RuleScore:
    recall: float  # planted rules found in the segment that holds most of their latent segment
    precision: float  # mined sequential rules consistent with some planted chain
    found: int
    planted: int
    mined: int
    segment_map: dict[int, int]  # latent segment -> mined segment


def planted_chains(rules: list[dict]) -> list[list[str]]:
    """The full chains (longest antecedent + consequent of each chain)."""
    longest: dict[tuple[int, str], list[str]] = {}
    for r in rules:
        chain = [*r["antecedent"], r["consequent"]]
        key = (r["segment"], chain[0])
        if len(chain) > len(longest.get(key, [])):
            longest[key] = chain
    return list(longest.values())


def score_rules(truth_dir: str | Path, mined: list[dict], assignments: dict[str, int]) -> RuleScore:
    """``mined``: dicts with segment_id, antecedent, consequent (sequential rules only);
    ``assignments``: user_id -> mined segment id."""
    truth = Path(truth_dir)
    rules = json.loads((truth / "rules.json").read_text())
    users = pq.read_table(truth / "users.parquet").to_pylist()
    votes: dict[int, dict[int, int]] = {}
    for u in users:
        if u["user_id"] in assignments:
            seg = votes.setdefault(u["segment"], {})
            seg[assignments[u["user_id"]]] = seg.get(assignments[u["user_id"]], 0) + 1
    segment_map = {latent: max(v, key=v.get) for latent, v in votes.items()}
    by_segment: dict[int, set[tuple]] = {}
    for m in mined:
        by_segment.setdefault(m["segment_id"], set()).add((tuple(m["antecedent"]), m["consequent"]))
    found = sum(
        1
        for r in rules
        if (tuple(r["antecedent"]), r["consequent"])
        in by_segment.get(segment_map.get(r["segment"], -1), set())
    )
    chains = planted_chains(rules)

    def consistent(ante: tuple, cons: str) -> bool:
        seq = [*ante, cons]
        for chain in chains:
            pos = [chain.index(x) if x in chain else -1 for x in seq]
            if -1 not in pos and pos == sorted(pos) and len(set(pos)) == len(pos):
                return True
        return False

    all_mined = [(tuple(m["antecedent"]), m["consequent"]) for m in mined]
    good = sum(1 for a, c in all_mined if consistent(a, c))
    return RuleScore(
        recall=found / len(rules) if rules else 1.0,
        precision=good / len(all_mined) if all_mined else 0.0,
        found=found,
        planted=len(rules),
        mined=len(all_mined),
        segment_map=segment_map,
    )
