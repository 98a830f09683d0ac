"""Each search option is declared once, in SearchSettings; the API, the CLI and the workers follow."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from autocompress.cli import build_parser
from autocompress.errors import UserError
from autocompress.plan import Budget
from autocompress.settings import SearchSettings, cli_options, flag, option_fields


def _search_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["search"]


def test_every_option_is_a_search_flag_with_the_fields_default_in_its_help():
    parser = _search_parser()
    dests = {a.dest: a for a in parser._actions}
    for f in option_fields():
        if not f.metadata.get("cli", True):
            continue
        assert f.name in dests, f.name
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            shown = ",".join(f.default) if isinstance(f.default, tuple) else str(f.default)
            assert f"(default {shown})" in dests[f.name].help, f.name


def test_an_empty_command_line_gives_the_api_defaults():
    a = _search_parser().parse_args(["--budget", "20x"])
    options = cli_options(a)
    assert options == {"budget": "20x"}
    from_cli = SearchSettings.from_options(options.pop("budget"), **options)
    assert from_cli == SearchSettings(budget=Budget(ratio=20.0))
    assert from_cli.early_stopping == "median" and from_cli.repair and from_cli.final_epochs == 2


def test_flags_reach_the_settings_parsed():
    a = _search_parser().parse_args(["--budget", "50KB", "--trials", "3", "--timeout", "30m", "--no-repair",
                                     "--objectives", "accuracy,size", "--latency-budget", "500us",
                                     "--early-stopping", "hyperband", "--image-size", "64", "--runs", "o"])
    options = cli_options(a)
    s = SearchSettings.from_options(options.pop("budget"), **options)
    assert (s.trials, s.timeout, s.repair, s.objectives) == (3, 1800.0, False, ("accuracy", "size"))
    assert (s.latency_budget, s.early_stopping, s.image_size, s.out) == (0.5, "hyperband", 64, "o")


@pytest.mark.parametrize("options,needle", [
    (dict(trials=0), "--trials must be at least 1, got 0"),
    (dict(final_epochs=-1), "--final-epochs must be at least 0"),
    (dict(final_distill=1.0), "--final-distill must be in [0, 1)"),
    (dict(val_fraction=0.0), "--val-fraction must be in (0, 1)"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(image_size=0), "--image-size must be at least 1"),
    (dict(epochs="two"), "--epochs takes a whole number, got 'two'"),
    (dict(early_stopping="sometimes"), "--early-stopping 'sometimes'"),
    (dict(objectives="size"), "--objectives 'size'"),
    (dict(timeout="soon"), "cannot parse duration"),
    (dict(colour="red"), "unknown option(s) colour"),
])
def test_out_of_range_or_unknown_options_are_one_user_error_line(options, needle):
    with pytest.raises(UserError) as e:
        SearchSettings.from_options("20x", **options)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_api_takes_the_old_boolean_early_stopping():
    assert SearchSettings.from_options("20x", early_stopping=True).early_stopping == "median"
    assert SearchSettings.from_options("20x", early_stopping=False).early_stopping == "none"


def test_options_round_trip_through_json_for_the_workers():
    import json

    s = SearchSettings.from_options("1.5MiB", trials=5, timeout="90s", objectives="accuracy,latency",
                                    latency_budget="2ms", study="x", storage="sqlite:///a.db")
    again = SearchSettings.from_options(**json.loads(json.dumps(s.options())))
    assert again == s


def test_api_search_documents_every_option():
    from autocompress.api import search

    assert list(inspect.signature(search).parameters) == ["budget", "options"]
    for f in option_fields()[1:]:
        assert f"    {f.name}" in search.__doc__, f.name


def test_flag_names():
    assert flag("final_distill") == "--final-distill"


def test_split_seed_defaults_to_seed_and_can_be_held_fixed():
    assert SearchSettings.from_options("8x", seed=3).data_seed == 3
    assert SearchSettings.from_options("8x", seed=3, split_seed=0).data_seed == 0


def test_time_budget_and_explore_share_are_parsed_and_checked():
    s = SearchSettings.from_options("8x", time_budget="10m", explore_share="0.25")
    assert s.time_budget == 600.0 and s.explore_share == 0.25
    with pytest.raises(UserError, match="--explore-share must be in"):
        SearchSettings.from_options("8x", explore_share=1.5)
    with pytest.raises(UserError, match="cannot parse duration"):
        SearchSettings.from_options("8x", time_budget="soon")


def test_the_search_aims_its_sensitivity_at_the_engines_default_time():
    from autocompress import sensitivity

    assert SearchSettings(budget=Budget(ratio=20.0)).sensitivity_seconds == sensitivity.SECONDS
