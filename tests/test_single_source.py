"""One list of linkages (atc.cluster.LINKAGES), one of methods (atc.merge.MERGE_METHODS), one keep-rate check:
every CLI and the detection backbone take them from there, so adding an entry is a change in one place."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

import atc.cluster
import atc.merge
from atc.merge import validate_keep_rate

ROOT = Path(__file__).resolve().parents[1]

# (script, function that builds or parses the arguments, flag) for every CLI with a --linkage or method flag
LINKAGE_FLAGS = [
    ("benchmark_atc_framework.py", "parse_args", "--linkage"),
    ("benchmark_merging_method.py", "parse_args", "--linkage"),
    ("validate_ots_sslbackbone.py", "parse_args", "--linkage"),
    ("visualize_merging.py", "parse_args", "--linkage"),
    ("SD_setup/benchmark_diffusion.py", "build_parser", "--linkage"),
    ("SD_setup/sd_generate.py", "build_parser", "--linkage"),
]
METHOD_FLAGS = [
    ("validate_ots_sslbackbone.py", "parse_args", "--merge_fn"),
    ("visualize_merging.py", "parse_args", "--merge_fn"),
]


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser(script: str, func: str, monkeypatch) -> argparse.ArgumentParser:
    """The script's ArgumentParser, caught as its parse function would use it (nothing is parsed)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"single_source_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    try:
        result = getattr(module, func)() if func == "build_parser" else getattr(module, func)([])
    except _Parsed as parsed:
        return parsed.parser
    return result


def _choices(parser: argparse.ArgumentParser, flag: str) -> list:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return list(action.choices)


@pytest.mark.parametrize("script, func, flag", LINKAGE_FLAGS)
def test_cli_linkage_choices_come_from_atc_cluster(script, func, flag, monkeypatch):
    assert _choices(_parser(script, func, monkeypatch), flag) == sorted(atc.cluster.LINKAGES)
    # a linkage added in one place (the table) reaches the CLI
    monkeypatch.setitem(atc.cluster.LINKAGES, "toy", atc.cluster.LINKAGES["average"])
    assert "toy" in _choices(_parser(script, func, monkeypatch), flag)


@pytest.mark.parametrize("script, func, flag", METHOD_FLAGS)
def test_cli_method_choices_come_from_atc_merge(script, func, flag, monkeypatch):
    assert _choices(_parser(script, func, monkeypatch), flag) == sorted(atc.merge.MERGE_METHODS)


def test_sd_method_choices_are_the_diffusers_patch_methods(monkeypatch):
    from atc.patch.diffusion import METHODS

    assert _choices(_parser("SD_setup/sd_generate.py", "build_parser", monkeypatch), "--merge_fn_str") == \
        ["none", *METHODS]
    assert _choices(_parser("SD_setup/benchmark_diffusion.py", "build_parser", monkeypatch), "--methods") == \
        ["none", *METHODS]


def test_no_literal_linkage_or_method_lists_in_the_clis():
    scripts = [*ROOT.glob("*.py"), *(ROOT / "SD_setup").glob("*.py"), *(ROOT / "MMDet_setup").glob("*.py"),
               ROOT / "atc" / "detection" / "vit_adapter.py", ROOT / "atc" / "engine.py"]
    for path in scripts:
        text = path.read_text()
        assert '"single", "complete", "average"' not in text, path
        assert '"atc", "tome", "kmedoids", "dpcknn"' not in text, path


def test_validate_keep_rate():
    assert validate_keep_rate(1) == 1.0 and validate_keep_rate("0.5") == 0.5
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"my_flag .* outside \(0, 1\]"):
            validate_keep_rate(bad, "my_flag")
    with pytest.raises(ValueError, match="not a number"):
        validate_keep_rate("half")


def test_keep_rate_check_is_shared_by_engine_and_detection():
    from atc.detection.vit_adapter import ViTAdapter
    from atc.cli import ConfigError
    from atc.models import validate_reduction

    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        validate_reduction(1.5, [3], "average")
    with pytest.raises(ValueError, match=r"reduction_ratio .* outside \(0, 1\]"):
        ViTAdapter(embed_dim=48, depth=4, num_heads=2, interaction_indexes=[[0, 1], [2, 3]], reduction_loc=[1],
                   reduction_ratio=0.0)


def test_vit_adapter_separates_method_from_linkage():
    from atc.detection.vit_adapter import ViTAdapter

    small = dict(embed_dim=48, depth=4, num_heads=2, interaction_indexes=[[0, 1], [2, 3]], reduction_loc=[1],
                 reduction_ratio=0.7, conv_inplane=8, deform_num_heads=2, use_extra_extractor=False)
    published = ViTAdapter(**small, linkage="tome")  # the published configs' spelling
    explicit = ViTAdapter(**small, method="tome")
    assert published.method == explicit.method == "tome" and published.blocks[1].method == "tome"
    atc_model = ViTAdapter(**small, method="atc", linkage="single")
    assert (atc_model.method, atc_model.blocks[1].linkage) == ("atc", "single")
    with pytest.raises(ValueError, match="unknown method"):
        ViTAdapter(**small, method="ward")
    with pytest.raises(ValueError, match="contradicts"):
        ViTAdapter(**small, method="kmedoids", linkage="tome")
    with pytest.raises(ValueError, match="at most half"):
        ViTAdapter(**{**small, "reduction_ratio": 0.3}, method="tome")
