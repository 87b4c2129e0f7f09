import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from patternlake.config import GenerateConfig
from patternlake.errors import PatternlakeError
from patternlake.synthetic.generate import generate, generate_events
from patternlake.synthetic.truth import planted_chains


def params(**kw) -> GenerateConfig:
    base = dict(
        users=200,
        items=150,
        events=8000,
        segments=2,
        rules_per_segment=3,
        rule_length=3,
        rule_strength=0.9,
        rule_noise=0.0,
        chain_rate=0.3,
        zipf_exponent=1.1,
        categories=6,
        start="2026-01-01T00:00:00Z",
        days=20,
        seed=3,
        format="csv",
        files=3,
    )
    base.update(kw)
    return GenerateConfig(**base)


def test_exact_event_count_duplicates_and_time_order():
    gen = generate_events(params())
    t = gen.events
    assert t.num_rows == 8000 + gen.duplicates
    assert len(set(t["event_id"].to_pylist())) == 8000
    times = t["event_time"].to_numpy()
    assert (np.diff(times) >= 0).all()
    assert set(t["event_type"].to_pylist()) <= {"view", "cart", "buy"}
    assert len(set(t["user_id"].to_pylist())) == 200


def test_planted_chains_are_followed_in_their_segment():
    gen = generate_events(params())
    by_user: dict[str, list[str]] = {}
    for u, i in zip(
        gen.events["user_id"].to_pylist(), gen.events["item_id"].to_pylist(), strict=True
    ):
        by_user.setdefault(u, []).append(i)
    seg = dict(zip(gen.users["user_id"].to_pylist(), gen.users["segment"].to_pylist(), strict=True))
    for rule in gen.rules:
        if len(rule["antecedent"]) != 1:
            continue
        a, b = rule["antecedent"][0], rule["consequent"]
        follows = total = 0
        for u, items in by_user.items():
            if seg[u] != rule["segment"]:
                continue
            for x, y in zip(items, items[1:], strict=False):
                if x == a:
                    total += 1
                    follows += y == b
        assert total > 0 and follows / total > 0.6, rule  # strength 0.9, no noise


def test_same_seed_same_data_and_files_in_every_format(tmp_path):
    assert generate_events(params()).events.equals(generate_events(params()).events)
    for fmt in ("csv", "jsonl", "parquet"):
        meta = generate(params(format=fmt, events=3000, users=100), tmp_path / fmt)
        files = sorted((tmp_path / fmt / "events").iterdir())
        assert len(files) == 3
        if fmt == "csv":
            rows = sum(pacsv.read_csv(f).num_rows for f in files)
        elif fmt == "parquet":
            rows = sum(pq.read_table(f).num_rows for f in files)
        else:
            lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
            rows = len(lines)
            assert lines[0]["event_time"].endswith("Z")
        assert rows == meta["rows"]
        truth = json.loads((tmp_path / fmt / "truth" / "rules.json").read_text())
        assert len(planted_chains(truth)) == 2 * 3


def test_impossible_parameters_are_user_errors(tmp_path):
    with pytest.raises(PatternlakeError, match="planted items needs --items"):
        generate(params(items=20), tmp_path / "x")
    with pytest.raises(PatternlakeError, match="at least --users"):
        generate(params(events=10), tmp_path / "y")
    generate(params(events=500, users=50), tmp_path / "z")
    with pytest.raises(PatternlakeError, match="not empty"):
        generate(params(events=500, users=50), tmp_path / "z")
