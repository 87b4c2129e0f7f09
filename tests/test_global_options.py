"""Global options (``--conf``, ``--set``, ``-v``) merge the same way wherever they stand:
before the command, after it, or after a nested command (``lake ... tables ...``).

A seeded property test (no hypothesis): random sequences of options, cut at random places
into a part before and a part after the command, resolve to the configuration the same
options give all before the command, in the order given (a later ``--set`` wins per key,
the last ``--conf`` wins)."""

from __future__ import annotations

import json
import os
import random

import pytest

from patternlake.cli import build_parser, main
from patternlake.config import load_config

KEYS = {
    "lake.root": ["/tmp/a", "/tmp/b", "/tmp/c"],
    "train.epochs": ["1", "2", "3"],
    "spark.shuffle_partitions": ["4", "8"],
    "score.top_k": ["5", "20"],
}


def _options(rng: random.Random, confs: list[str]) -> list[list[str]]:
    """A random sequence of global options, each as its argument list."""
    out: list[list[str]] = []
    for _ in range(rng.randint(1, 7)):
        kind = rng.random()
        if kind < 0.7:
            key = rng.choice(list(KEYS))
            out.append(["--set", f"{key}={rng.choice(KEYS[key])}"])
        elif kind < 0.9:
            out.append(["--conf", rng.choice(confs)])
        else:
            out.append([rng.choice(["-v", "--verbose"])])
    return out


def _flat(options: list[list[str]]) -> list[str]:
    return [a for o in options for a in o]


def _resolved(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def confs(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("lake:\n  root: /tmp/from-file\ntrain:\n  epochs: 9\n")
    return ["local", "cluster", str(own)]


def test_reported_case_set_after_the_command_keeps_the_one_before(capsys):
    out = _resolved(["--set", "lake.root=/tmp/x", "config", "--set", "train.epochs=1"], capsys)
    assert out["lake"]["root"] == "/tmp/x"
    assert out["train"]["epochs"] == 1


def test_config_is_the_same_wherever_the_options_stand(confs, capsys, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PATTERNLAKE__"):
            monkeypatch.delenv(key)
    rng = random.Random(32)
    for _ in range(30):
        options = _options(rng, confs)
        reference = _resolved([*_flat(options), "config"], capsys)
        sets = [o[1] for o in options if o[0] == "--set"]
        conf = next((o[1] for o in reversed(options) if o[0] == "--conf"), None)
        expected = load_config(conf, sets).model_dump(mode="json", by_alias=True)
        assert reference == json.loads(json.dumps(expected)), options
        # the same sequence cut anywhere: a prefix before the command, the rest after
        cut = rng.randint(0, len(options))
        argv = [*_flat(options[:cut]), "config", *_flat(options[cut:])]
        assert _resolved(argv, capsys) == reference, argv
        # any options moved after the command: they apply after those left before it
        after = [o for o in options if rng.random() < 0.5]
        before = [o for o in options if not any(o is a for a in after)]
        moved = [*before, *after]
        sets = [o[1] for o in moved if o[0] == "--set"]
        conf = next((o[1] for o in reversed(moved) if o[0] == "--conf"), None)
        expected = load_config(conf, sets).model_dump(mode="json", by_alias=True)
        argv = [*_flat(before), "config", *_flat(after)]
        assert _resolved(argv, capsys) == json.loads(json.dumps(expected)), argv


def test_nested_commands_merge_every_level():
    """``lake`` and ``tune`` hold commands of their own: options at each of the three places."""
    parser = build_parser()
    rng = random.Random(7)
    for _ in range(200):
        options = _options(rng, ["local", "cluster"])
        cuts = sorted(rng.randint(0, len(options)) for _ in range(2))
        parts = options[: cuts[0]], options[cuts[0] : cuts[1]], options[cuts[1] :]
        argv = [*_flat(parts[0]), "lake", *_flat(parts[1]), "tables", *_flat(parts[2])]
        args = parser.parse_args(argv)
        assert args.overrides == [o[1] for o in options if o[0] == "--set"], argv
        assert args.conf == next((o[1] for o in reversed(options) if o[0] == "--conf"), None)
        assert args.verbose == any(o[0] in ("-v", "--verbose") for o in options), argv
        assert args.lake_command == "tables"
